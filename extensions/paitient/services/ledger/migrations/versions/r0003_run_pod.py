"""The pod a reservation was made from, for one made through the workspace's gateway (Kubernetes).

Such a reservation's ``pid`` and ``pid_start`` are the kernel's as its pod's relay sees them, not this
machine's: the reservation lives while that pod reports the kernel alive (:class:`~paitient.services.ledger.
service.PodReports`), and counts in full once it stops. Empty for a reservation made on this machine.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("pod", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    op.drop_column("runs", "pod")
