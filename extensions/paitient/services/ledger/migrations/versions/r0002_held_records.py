"""Records the audit trail could not take, kept by the ledger until it can (:mod:`paitient.services.kit.backlog`).

A record of a settlement, a release or a lost run that the trail refused waits in this table instead of
only in the service's memory, so a restart of the ledger service while the trail is down loses none: the
service writes them, in order, before anything else once the trail takes records again.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The same SQL on SQLite and PostgreSQL; ``seq`` is given by the store (the order the records happened in).
    op.execute(
        """CREATE TABLE held_records (
            seq BIGINT PRIMARY KEY,
            held DOUBLE PRECISION NOT NULL,
            record TEXT NOT NULL
        )"""
    )


def downgrade() -> None:
    op.drop_table("held_records")
