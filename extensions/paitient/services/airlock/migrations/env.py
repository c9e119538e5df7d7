"""alembic's entry point: run the revisions on the connection the store opened, inside its transaction."""

from paitient.services.kit.db import run_migrations

run_migrations()
