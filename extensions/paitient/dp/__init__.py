"""paitient.dp"""
