"""The ledger's tables as the store made them before migrations: runs (reservations) and budget_overrides.

Revision ID: 0001
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATEMENTS = (
    """CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        project TEXT NOT NULL,
        dataset TEXT NOT NULL,
        username TEXT NOT NULL,
        run_id TEXT NOT NULL,
        pid BIGINT NOT NULL,
        pid_start BIGINT,
        epsilon DOUBLE PRECISION NOT NULL,
        delta DOUBLE PRECISION NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('reserved', 'settled', 'lost')),
        epsilon_spent DOUBLE PRECISION,
        delta_spent DOUBLE PRECISION,
        created DOUBLE PRECISION NOT NULL,
        closed DOUBLE PRECISION,
        record TEXT,
        weights_sha256 TEXT
    )""",
    "CREATE INDEX runs_dataset ON runs (project, dataset)",
    "CREATE INDEX runs_state ON runs (state)",
    "CREATE INDEX runs_weights ON runs (weights_sha256)",
    """CREATE TABLE budget_overrides (
        project TEXT NOT NULL,
        dataset TEXT NOT NULL,
        epsilon DOUBLE PRECISION NOT NULL,
        delta DOUBLE PRECISION NOT NULL,
        set_by TEXT NOT NULL,
        set_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (project, dataset)
    )""",
)


def upgrade() -> None:
    # The same SQL on SQLite and PostgreSQL (the types are ones both know).
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.drop_table("budget_overrides")
    op.drop_table("runs")
