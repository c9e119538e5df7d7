"""paitient.sandbox"""
