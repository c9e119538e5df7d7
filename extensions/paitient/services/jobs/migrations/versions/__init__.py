"""Revisions of the jobs store's tables, oldest first: ``r0001_initial`` is how it made them before migrations."""
