"""The canonical count tables of a project's table requests, kept in the airlock's database.

The checks keep each count table's canonical form (:class:`paitient.rules.differencing.CountTable`) in the
``count_tables`` table of ``airlock.db``, beside its request. A table counts as *released* exactly when its
request's state is ``released``: the release is the state change, written in one transaction with its event
(:mod:`paitient.services.airlock.store`), so a crash leaves the table released or not, never half-recorded.
Tables of requests in review are compared too (a steward may release both): a difference with one of those is
sent to review. Rows are written in one statement each (SQLite, WAL, full synchronous writes).
"""

from __future__ import annotations

import json
import time

from paitient.rules import review
from paitient.rules.differencing import CountTable
from paitient.services.airlock.store import Store

SCHEMA = """
CREATE TABLE IF NOT EXISTS count_tables (
    request_id TEXT PRIMARY KEY REFERENCES requests(id),
    project TEXT NOT NULL,
    body TEXT NOT NULL,
    recorded REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS count_tables_project ON count_tables(project);
"""


class ReleasedTables:
    """The count tables of the requests in one airlock store."""

    def __init__(self, store: Store):
        self.store = store
        with store._connect() as db:
            db.executescript(SCHEMA)

    def stage(self, rid: str, project: str, table: CountTable) -> None:
        """Keep the canonical table of request ``rid`` (replacing one from an interrupted check)."""
        body = json.dumps(table.to_json(), sort_keys=True, separators=(",", ":"))
        with self.store._transaction() as db:
            state = db.execute("SELECT state FROM requests WHERE id = ?", (rid,)).fetchone()
            if state is None or state["state"] == review.RELEASED:
                return  # a released table never changes
            db.execute(
                "INSERT OR REPLACE INTO count_tables (request_id, project, body, recorded) VALUES (?, ?, ?, ?)",
                (rid, project, body, time.time()),
            )

    def earlier(self, project: str, rid: str) -> list[tuple[str, CountTable, bool]]:
        """``(request id, table, released)`` for the project's other tables, released or in review."""
        with self.store._connect() as db:
            rows = db.execute(
                "SELECT t.request_id, t.body, r.state FROM count_tables t JOIN requests r ON r.id = t.request_id "
                "WHERE t.project = ? AND t.request_id != ? AND r.state IN (?, ?) ORDER BY r.created",
                (project, rid, review.RELEASED, review.IN_REVIEW),
            ).fetchall()
        return [
            (r["request_id"], CountTable.from_json(json.loads(r["body"])), r["state"] == review.RELEASED) for r in rows
        ]

    def released(self, project: str) -> list[str]:
        """Ids of the project's released count tables, oldest first."""
        with self.store._connect() as db:
            rows = db.execute(
                "SELECT t.request_id FROM count_tables t JOIN requests r ON r.id = t.request_id "
                "WHERE t.project = ? AND r.state = ? ORDER BY r.updated",
                (project, review.RELEASED),
            ).fetchall()
        return [r["request_id"] for r in rows]
