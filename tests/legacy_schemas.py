"""The stores' tables as they made them before there were migrations, verbatim from the stores' code of
commit 22ad015 (``git show 22ad015:extensions/paitient/services/<store>/store.py``, the airlock's count
tables from its ``releases.py``): the tests make a database
with them, as a workspace from before holds, and check that each store recognises it and stamps it."""

import sqlite3
from pathlib import Path

LEDGER = (
    """CREATE TABLE IF NOT EXISTS runs (
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
    "CREATE INDEX IF NOT EXISTS runs_dataset ON runs (project, dataset)",
    "CREATE INDEX IF NOT EXISTS runs_state ON runs (state)",
    "CREATE INDEX IF NOT EXISTS runs_weights ON runs (weights_sha256)",
    """CREATE TABLE IF NOT EXISTS budget_overrides (
        project TEXT NOT NULL,
        dataset TEXT NOT NULL,
        epsilon DOUBLE PRECISION NOT NULL,
        delta DOUBLE PRECISION NOT NULL,
        set_by TEXT NOT NULL,
        set_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (project, dataset)
    )""",
)

AIRLOCK = """
CREATE TABLE IF NOT EXISTS requests (
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
);
CREATE INDEX IF NOT EXISTS requests_project ON requests(project);
CREATE INDEX IF NOT EXISTS requests_username ON requests(username);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL REFERENCES requests(id),
    ts REAL NOT NULL,
    actor TEXT NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_request ON events(request_id);
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'airlock events are append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'airlock events are append-only'); END;
CREATE TRIGGER IF NOT EXISTS requests_no_delete BEFORE DELETE ON requests
    BEGIN SELECT RAISE(ABORT, 'airlock requests are never deleted'); END;
"""

AIRLOCK_COUNT_TABLES = """
CREATE TABLE IF NOT EXISTS count_tables (
    request_id TEXT PRIMARY KEY REFERENCES requests(id),
    project TEXT NOT NULL,
    body TEXT NOT NULL,
    recorded REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS count_tables_project ON count_tables(project);
"""
"""(made by ``releases.py`` at the checks' first start)"""

JOBS = """CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    project TEXT NOT NULL,
    dataset TEXT NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    graph_sha256 TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    cancel INTEGER NOT NULL DEFAULT 0,
    progress TEXT NOT NULL DEFAULT '{}',
    reason TEXT NOT NULL DEFAULT '',
    reservation TEXT NOT NULL DEFAULT ''
)"""

EGRESS = (
    """CREATE TABLE IF NOT EXISTS usage (
        user TEXT NOT NULL,
        day TEXT NOT NULL,
        bytes INTEGER NOT NULL DEFAULT 0,
        outputs INTEGER NOT NULL DEFAULT 0,
        withheld INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (user, day))""",
    """CREATE TABLE IF NOT EXISTS revealed (
        user TEXT NOT NULL,
        day TEXT NOT NULL,
        dataset TEXT NOT NULL,
        row INTEGER NOT NULL,
        PRIMARY KEY (user, day, dataset, row)) WITHOUT ROWID""",
)


def make_sqlite(path: Path, statements: tuple[str, ...] | str) -> None:
    """A SQLite database at ``path`` with the tables the old code made (root 0600 in a 0700 folder)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        if isinstance(statements, str):
            db.executescript(statements)
        else:
            for statement in statements:
                db.execute(statement)
    path.chmod(0o600)
