"""Records the audit trail could not take, kept by the ledger until it can (:mod:`paitient.services.kit.backlog`).

A record of a settlement, a release or a lost run that the trail refused waits in this table instead of
only in the service's memory, so a restart of the ledger service while the trail is down loses none: the
service writes them, in order, before anything else once the trail takes records again.

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
