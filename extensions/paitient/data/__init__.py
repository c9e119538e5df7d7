"""paitient.data"""
