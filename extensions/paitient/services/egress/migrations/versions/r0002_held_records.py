"""Records the audit trail could not take, kept by the egress service until it can
(:mod:`paitient.services.kit.backlog`): a restart of the service while the trail is down loses none of the
``egress.output`` and ``egress.withheld`` records of what left meanwhile.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
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
