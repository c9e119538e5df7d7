"""Records the audit trail could not take, kept by the airlock until it can
(:mod:`paitient.services.kit.backlog`): the records of refusals, checks and denied previews and downloads
that may happen while the trail is down (what needs its record first does not happen then).

Revision ID: 0003
Revises: 0002
"""

from alembic import op

from paitient.services.kit.backlog import HELD_RECORDS_TABLE

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(HELD_RECORDS_TABLE)


def downgrade() -> None:
    op.drop_table("held_records")
