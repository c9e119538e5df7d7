"""The airlock's tables as the store made them before migrations: requests, and events that are append-only.

On SQLite the statements are the store's own from before; on PostgreSQL the same tables with PostgreSQL's
types (``DOUBLE PRECISION`` for times: its ``REAL`` has 24 bits), and the append-only rule as triggers of a
PL/pgSQL function (TRUNCATE, which skips row triggers, refused as well).

Revision ID: 0001
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SQLITE = (
    """CREATE TABLE requests (
        id TEXT PRIMARY KEY,
        project TEXT NOT NULL,
        username TEXT NOT NULL,
        account TEXT NOT NULL,
        uid INTEGER NOT NULL,
        kind TEXT NOT NULL,
        filename TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        justification TEXT NOT NULL,
        meta TEXT NOT NULL,
        state TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL
    )""",
    "CREATE INDEX requests_project ON requests(project)",
    "CREATE INDEX requests_username ON requests(username)",
    """CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        request_id TEXT NOT NULL REFERENCES requests(id),
        ts REAL NOT NULL,
        actor TEXT NOT NULL,
        type TEXT NOT NULL,
        data TEXT NOT NULL
    )""",
    "CREATE INDEX events_request ON events(request_id)",
    """CREATE TRIGGER events_no_update BEFORE UPDATE ON events
        BEGIN SELECT RAISE(ABORT, 'airlock events are append-only'); END""",
    """CREATE TRIGGER events_no_delete BEFORE DELETE ON events
        BEGIN SELECT RAISE(ABORT, 'airlock events are append-only'); END""",
    """CREATE TRIGGER requests_no_delete BEFORE DELETE ON requests
        BEGIN SELECT RAISE(ABORT, 'airlock requests are never deleted'); END""",
)

POSTGRESQL = (
    """CREATE TABLE requests (
        id TEXT PRIMARY KEY,
        project TEXT NOT NULL,
        username TEXT NOT NULL,
        account TEXT NOT NULL,
        uid BIGINT NOT NULL,
        kind TEXT NOT NULL,
        filename TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size BIGINT NOT NULL,
        justification TEXT NOT NULL,
        meta TEXT NOT NULL,
        state TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        updated DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX requests_project ON requests(project)",
    "CREATE INDEX requests_username ON requests(username)",
    """CREATE TABLE events (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        request_id TEXT NOT NULL REFERENCES requests(id),
        ts DOUBLE PRECISION NOT NULL,
        actor TEXT NOT NULL,
        type TEXT NOT NULL,
        data TEXT NOT NULL
    )""",
    "CREATE INDEX events_request ON events(request_id)",
    """CREATE FUNCTION airlock_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION '%', TG_ARGV[0] USING ERRCODE = 'integrity_constraint_violation'; END $$""",
    """CREATE TRIGGER events_no_update BEFORE UPDATE ON events
        FOR EACH ROW EXECUTE FUNCTION airlock_refuse('airlock events are append-only')""",
    """CREATE TRIGGER events_no_delete BEFORE DELETE ON events
        FOR EACH ROW EXECUTE FUNCTION airlock_refuse('airlock events are append-only')""",
    """CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
        FOR EACH STATEMENT EXECUTE FUNCTION airlock_refuse('airlock events are append-only')""",
    """CREATE TRIGGER requests_no_delete BEFORE DELETE ON requests
        FOR EACH ROW EXECUTE FUNCTION airlock_refuse('airlock requests are never deleted')""",
    """CREATE TRIGGER requests_no_truncate BEFORE TRUNCATE ON requests
        FOR EACH STATEMENT EXECUTE FUNCTION airlock_refuse('airlock requests are never deleted')""",
)


def upgrade() -> None:
    for statement in POSTGRESQL if op.get_bind().dialect.name == "postgresql" else SQLITE:
        op.execute(statement)


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("requests")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION airlock_refuse()")
