"""The egress counts as the store made them before migrations: ``usage`` (a user's bytes and outputs per
day) and ``revealed`` (the distinct dataset rows a user saw that day).

On SQLite the statements are the store's own from before (so an ``egress.sqlite3`` from then is recognised
by its columns and stamped); on PostgreSQL the same tables with 64-bit counts, and ``"user"`` quoted (a
reserved word there).

Revision ID: 0001
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SQLITE = (
    """CREATE TABLE usage (
        user TEXT NOT NULL,
        day TEXT NOT NULL,
        bytes INTEGER NOT NULL DEFAULT 0,
        outputs INTEGER NOT NULL DEFAULT 0,
        withheld INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (user, day))""",
    """CREATE TABLE revealed (
        user TEXT NOT NULL,
        day TEXT NOT NULL,
        dataset TEXT NOT NULL,
        row INTEGER NOT NULL,
        PRIMARY KEY (user, day, dataset, row)) WITHOUT ROWID""",
)

POSTGRES = (
    """CREATE TABLE usage (
        "user" TEXT NOT NULL,
        day TEXT NOT NULL,
        bytes BIGINT NOT NULL DEFAULT 0,
        outputs BIGINT NOT NULL DEFAULT 0,
        withheld BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY ("user", day))""",
    """CREATE TABLE revealed (
        "user" TEXT NOT NULL,
        day TEXT NOT NULL,
        dataset TEXT NOT NULL,
        "row" BIGINT NOT NULL,
        PRIMARY KEY ("user", day, dataset, "row"))""",
)


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for statement in POSTGRES if postgres else SQLITE:
        op.execute(statement)


def downgrade() -> None:
    op.drop_table("revealed")
    op.drop_table("usage")
