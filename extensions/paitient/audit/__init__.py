"""paitient.audit"""
