"""paitient.kernel"""
