"""paitient.server"""
