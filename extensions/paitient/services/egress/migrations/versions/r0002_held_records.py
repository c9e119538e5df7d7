"""Records the audit trail could not take, kept by the egress service until it can
(:mod:`paitient.services.kit.backlog`): a restart of the service while the trail is down loses none of the
``egress.output`` and ``egress.withheld`` records of what left meanwhile.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

from paitient.services.kit.backlog import HELD_RECORDS_TABLE

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(HELD_RECORDS_TABLE)


def downgrade() -> None:
    op.drop_table("held_records")
