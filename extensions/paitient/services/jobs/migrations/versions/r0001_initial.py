"""The runner's queue as the store made it before migrations: one ``jobs`` table, a row per job.

On SQLite the statement is the store's own from before (so a ``jobs.sqlite3`` from then is recognised by its
columns and stamped); on PostgreSQL the same table with PostgreSQL's types (``DOUBLE PRECISION`` for times: its
``REAL`` has 24 bits).

Revision ID: 0001
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TABLE = """CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    project TEXT NOT NULL,
    dataset TEXT NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    graph_sha256 TEXT NOT NULL,
    created {real} NOT NULL,
    started {real},
    finished {real},
    cancel INTEGER NOT NULL DEFAULT 0,
    progress TEXT NOT NULL DEFAULT '{{}}',
    reason TEXT NOT NULL DEFAULT '',
    reservation TEXT NOT NULL DEFAULT ''
)"""


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.execute(TABLE.format(real="DOUBLE PRECISION" if postgres else "REAL"))


def downgrade() -> None:
    op.drop_table("jobs")
