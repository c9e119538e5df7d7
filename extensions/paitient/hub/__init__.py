"""paitient.hub"""
