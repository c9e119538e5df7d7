"""paitient.ledger"""
