"""The checks' canonical count tables, beside their requests (:mod:`paitient.services.airlock.releases`).

Before migrations the checks made this table at their first start, so a database from then may hold it or
not: it is made only where it is missing.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TABLE = """CREATE TABLE IF NOT EXISTS count_tables (
    request_id TEXT PRIMARY KEY REFERENCES requests(id),
    project TEXT NOT NULL,
    body TEXT NOT NULL,
    recorded {real} NOT NULL
)"""


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.execute(TABLE.format(real="DOUBLE PRECISION" if postgres else "REAL"))
    op.execute("CREATE INDEX IF NOT EXISTS count_tables_project ON count_tables(project)")


def downgrade() -> None:
    op.drop_table("count_tables")
