"""The canonical count tables of a project's table requests, kept in the airlock's database.

The checks keep each count table's canonical form (:class:`paitient.rules.differencing.CountTable`) in the
``count_tables`` table of the airlock's database, beside its request (made by the store's migrations). A
table counts as *released* exactly when its request's state is ``released``: the release is the state
change, written in one transaction with its event (:mod:`paitient.services.airlock.store`), so a crash
leaves the table released or not, never half-recorded. Tables of requests in review are compared too (a
steward may release both): a difference with one of those is sent to review. Rows are written in one
statement each, in the store's write transactions.
"""

from __future__ import annotations

import json
import time

import sqlalchemy as sa

from paitient.rules import review
from paitient.rules.differencing import CountTable
from paitient.services.airlock.store import Store


class ReleasedTables:
    """The count tables of the requests in one airlock store."""

    def __init__(self, store: Store):
        self.store = store

    def stage(self, rid: str, project: str, table: CountTable) -> None:
        """Keep the canonical table of request ``rid`` (replacing one from an interrupted check)."""
        body = json.dumps(table.to_json(), sort_keys=True, separators=(",", ":"))
        with self.store._transaction() as db:
            state = db.execute(sa.text("SELECT state FROM requests WHERE id = :id"), {"id": rid}).first()
            if state is None or state.state == review.RELEASED:
                return  # a released table never changes
            db.execute(
                sa.text(
                    "INSERT INTO count_tables (request_id, project, body, recorded) "
                    "VALUES (:id, :project, :body, :recorded) ON CONFLICT (request_id) DO UPDATE SET "
                    "project = excluded.project, body = excluded.body, recorded = excluded.recorded"
                ),
                {"id": rid, "project": project, "body": body, "recorded": time.time()},
            )

    def earlier(self, project: str, rid: str) -> list[tuple[str, CountTable, bool]]:
        """``(request id, table, released)`` for the project's other tables, released or in review."""
        with self.store._connect() as db:
            rows = db.execute(
                sa.text(
                    "SELECT t.request_id, t.body, r.state FROM count_tables t JOIN requests r ON r.id = t.request_id "
                    "WHERE t.project = :project AND t.request_id != :id AND r.state IN (:released, :in_review) "
                    "ORDER BY r.created"
                ),
                {"project": project, "id": rid, "released": review.RELEASED, "in_review": review.IN_REVIEW},
            ).all()
        return [(r.request_id, CountTable.from_json(json.loads(r.body)), r.state == review.RELEASED) for r in rows]

    def released(self, project: str) -> list[str]:
        """Ids of the project's released count tables, oldest first."""
        with self.store._connect() as db:
            rows = db.execute(
                sa.text(
                    "SELECT t.request_id FROM count_tables t JOIN requests r ON r.id = t.request_id "
                    "WHERE t.project = :project AND r.state = :released ORDER BY r.updated"
                ),
                {"project": project, "released": review.RELEASED},
            ).all()
        return [r.request_id for r in rows]

    def tables(self, project: str, ids: list[str]) -> dict[str, tuple[CountTable, str]]:
        """``request id -> (table, request state)`` of those of ``ids`` that kept a count table in ``project``,
        whatever their state now (a steward's page shows what a check compared)."""
        if not ids:
            return {}
        with self.store._connect() as db:
            rows = db.execute(
                sa.text(
                    "SELECT t.request_id, t.body, r.state FROM count_tables t JOIN requests r ON r.id = t.request_id "
                    "WHERE t.project = :project AND t.request_id IN :ids"
                ).bindparams(sa.bindparam("ids", expanding=True)),
                {"project": project, "ids": list(ids)},
            ).all()
        return {r.request_id: (CountTable.from_json(json.loads(r.body)), r.state) for r in rows}
