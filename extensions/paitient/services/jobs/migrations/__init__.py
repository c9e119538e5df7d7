"""The jobs store's alembic migrations (run by :class:`paitient.services.kit.db.Database` at start)."""
