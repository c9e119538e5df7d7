"""paitient.airlock"""
