"""Records the audit trail could not take, kept by the airlock until it can
(:mod:`paitient.services.kit.backlog`): the records of refusals, checks and denied previews and downloads
that may happen while the trail is down (what needs its record first does not happen then).

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The same SQL on SQLite and PostgreSQL; ``seq`` is given by the service (the order the records came in).
    op.execute(
        """CREATE TABLE held_records (
            seq BIGINT PRIMARY KEY,
            held DOUBLE PRECISION NOT NULL,
            record TEXT NOT NULL
        )"""
    )


def downgrade() -> None:
    op.drop_table("held_records")
