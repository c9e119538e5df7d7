"""The airlock's storage under ``<state_dir>/airlock`` (root only): immutable blobs and a SQLite record.

- ``blobs/<sha256[:2]>/<sha256>``: each request's file (the airlock's canonical re-encoding of the upload,
  :func:`paitient.services.airlock.canonical.canonical_output`; a training job's weights as the runner signed
  them), written aside, fsync'd, made read-only (0400) and
  renamed into place; a blob never changes, so the SHA-256 recorded with a request always names its bytes.
- ``airlock.db`` (or the schema ``airlock`` of ``[database] url``'s PostgreSQL database): the ``requests``
  table holds each request and its current state; the ``events`` table records every state change, check
  result, decision and download as an append-only row (triggers refuse UPDATE and DELETE). The state and its
  event are written in one transaction, so after a crash the database holds both or neither. SQLite runs in
  WAL mode with full synchronous writes; writers are serialised on either database
  (:mod:`paitient.services.kit.db`), and the tables are made and upgraded by ``migrations/versions``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import stat
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa

from paitient.fsutil import fsync_dir
from paitient.rules import review
from paitient.services.kit.db import Database, Location

CHUNK = 1 << 20

MIGRATIONS = Path(__file__).parent / "migrations"
TABLES = {
    "requests": (
        "id",
        "project",
        "username",
        "account",
        "uid",
        "kind",
        "filename",
        "sha256",
        "size",
        "justification",
        "meta",
        "state",
        "created",
        "updated",
    ),
    "events": ("seq", "request_id", "ts", "actor", "type", "data"),
}
"""The tables and their columns as the first migration makes them."""

EVENT_TYPES = ("state", "check", "decision", "download", "note", "preview", "graph")


class StoreError(Exception):
    """The store refused an operation; the message says why."""


DAY = 24 * 3600


class TooManyRequests(StoreError):
    """A user has filed as many requests in the last 24 hours as they may; ``next_at`` is when the oldest of
    them leaves that window."""

    def __init__(self, filed: int, limit: int, next_at: float):
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(next_at + 60))
        super().__init__(
            f"you have filed {filed} airlock requests in the last 24 hours, as many as the workspace allows "
            f"([airlock] requests_per_day = {limit}); the next can be filed from {when}. Check an output "
            "first with airlock.check(...), which files nothing, and ask a steward if you need more"
        )
        self.filed, self.limit, self.next_at = filed, limit, next_at


@dataclass(frozen=True)
class Request:
    id: str
    project: str
    username: str
    account: str
    uid: int
    kind: str
    filename: str
    sha256: str
    size: int
    justification: str
    meta: dict[str, Any]
    state: str
    created: float
    updated: float

    def public(self) -> dict[str, Any]:
        """What the requester sees about their request (no internal paths)."""
        return {
            "id": self.id,
            "project": self.project,
            "username": self.username,
            "kind": self.kind,
            "filename": self.filename,
            "sha256": self.sha256,
            "size": self.size,
            "justification": self.justification,
            "state": self.state,
            "created": self.created,
            "updated": self.updated,
        }


@dataclass(frozen=True)
class ReleasedFile:
    """A file a request leaves as instead of the one it was filed with (its blob stored already)."""

    filename: str
    sha256: str
    size: int
    meta: dict[str, Any]


@dataclass(frozen=True)
class Event:
    seq: int
    request_id: str
    ts: float
    actor: str
    type: str
    data: dict[str, Any] = field(default_factory=dict)


_Row = TypeVar("_Row", "Request", "Event")


def _from_row(cls: type[_Row], row: sa.Row[Any], json_column: str) -> _Row:
    """The dataclass ``cls`` of a table row whose columns are its fields; ``json_column`` holds JSON text."""
    values = dict(row._mapping)
    values[json_column] = json.loads(values[json_column])
    return cls(**values)


def _row_request(r: sa.Row[Any]) -> Request:
    return _from_row(Request, r, "meta")


def _row_event(r: sa.Row[Any]) -> Event:
    return _from_row(Event, r, "data")


def new_request_id() -> str:
    return time.strftime("%Y%m%d-", time.gmtime()) + secrets.token_hex(4)


class Store:
    """Blobs and the request database. Safe to use from several threads (a connection per operation)."""

    def __init__(self, root: str | os.PathLike[str], database: Location | None = None):
        """Blobs under ``root``; the records in ``database`` (default: SQLite at ``<root>/airlock.db``)."""
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.db_path = self.root / "airlock.db"
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.blobs.mkdir(mode=0o700, exist_ok=True)
        self.db = Database(database or Location(self.db_path), what="airlock", migrations=MIGRATIONS, tables=TABLES)

    @classmethod
    def for_site(cls, site) -> Store:
        root = site.state_dir / "airlock"
        return cls(root, Location.for_site(site, "airlock", root / "airlock.db"))

    def close(self) -> None:
        self.db.close()

    def _connect(self) -> AbstractContextManager[sa.Connection]:
        return self.db.transaction(write=False)

    def _transaction(self) -> AbstractContextManager[sa.Connection]:
        return self.db.transaction(write=True)

    # ---------------------------------------------------------------------------------------------
    # Blobs

    def blob_path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise StoreError(f"not a SHA-256 hex digest: {sha256!r}")
        return self.blobs / sha256[:2] / sha256

    def put_blob_from_fd(self, fd: int, max_bytes: int) -> tuple[str, int]:
        """Copy an open regular file into the blob store; return (sha256, size).

        Reads from offset 0 with ``pread`` whatever the caller's file position, refuses anything that is
        not a regular file or is larger than ``max_bytes``.
        """
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError("only regular files can be submitted (not a directory, pipe or device)")
        if st.st_size > max_bytes:
            raise StoreError(f"the file has {st.st_size} bytes; the airlock takes at most {max_bytes}")
        h = hashlib.sha256()
        tmp_fd, tmp = tempfile.mkstemp(prefix=".incoming.", dir=self.blobs)
        size = 0
        try:
            with os.fdopen(tmp_fd, "wb") as out:
                while True:
                    chunk = os.pread(fd, CHUNK, size)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > max_bytes:
                        raise StoreError(f"the file grew beyond {max_bytes} bytes while it was read")
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o400)
            digest = h.hexdigest()
            target = self.blob_path(digest)
            target.parent.mkdir(mode=0o700, exist_ok=True)
            if target.exists():
                os.unlink(tmp)
            else:
                os.replace(tmp, target)
                fsync_dir(target.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return digest, size

    def put_blob(self, data: bytes) -> tuple[str, int]:
        """Store ``data`` (the airlock's own re-encoding of an upload) as a blob; return (sha256, size). Written
        aside, fsync'd, made read-only and renamed into place, like an upload."""
        digest = hashlib.sha256(data).hexdigest()
        target = self.blob_path(digest)
        if target.exists():
            return digest, len(data)
        tmp_fd, tmp = tempfile.mkstemp(prefix=".canonical.", dir=self.blobs)
        try:
            with os.fdopen(tmp_fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o400)
            target.parent.mkdir(mode=0o700, exist_ok=True)
            os.replace(tmp, target)
            fsync_dir(target.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return digest, len(data)

    def read_blob(self, sha256: str) -> bytes:
        return self.blob_path(sha256).read_bytes()

    # ---------------------------------------------------------------------------------------------
    # Requests and events

    def create(
        self,
        *,
        project: str,
        username: str,
        account: str,
        uid: int,
        kind: str,
        filename: str,
        sha256: str,
        size: int,
        justification: str,
        meta: dict[str, Any],
        before_commit: Callable[[str], None] | None = None,
        per_day: int | None = None,
    ) -> Request:
        """File a request. ``before_commit(id)`` runs inside the transaction, after the request is written and
        before it is committed: if it raises (the audit record could not be written), nothing is filed.

        With ``per_day``, :class:`TooManyRequests` when ``username`` has filed that many in the last 24 hours:
        counted in the same write transaction as the insert, so two filings at once cannot both pass."""
        now = time.time()
        rid = new_request_id()
        with self._transaction() as db:
            if per_day is not None:
                self._within_day(db, username, per_day, now)
            db.execute(
                sa.text(
                    "INSERT INTO requests (id, project, username, account, uid, kind, filename, sha256, size, "
                    "justification, meta, state, created, updated) VALUES (:id, :project, :username, :account, "
                    ":uid, :kind, :filename, :sha256, :size, :justification, :meta, :state, :now, :now)"
                ),
                {
                    "id": rid,
                    "project": project,
                    "username": username,
                    "account": account,
                    "uid": uid,
                    "kind": kind,
                    "filename": filename,
                    "sha256": sha256,
                    "size": size,
                    "justification": justification,
                    "meta": json.dumps(meta, sort_keys=True),
                    "state": review.SUBMITTED,
                    "now": now,
                },
            )
            self._event(db, rid, username, "state", {"from": None, "to": review.SUBMITTED}, now)
            if before_commit is not None:
                before_commit(rid)
        return self.get(rid)

    @staticmethod
    def _within_day(db: sa.Connection, username: str, limit: int, now: float) -> None:
        filed, oldest = db.execute(
            sa.text("SELECT COUNT(*), MIN(created) FROM requests WHERE username = :u AND created > :since"),
            {"u": username, "since": now - DAY},
        ).one()
        if int(filed) >= limit:
            raise TooManyRequests(int(filed), limit, float(oldest) + DAY)

    def may_file(self, username: str, limit: int) -> None:
        """:class:`TooManyRequests` when ``username`` may file no request now (an early answer, before the
        upload is read; :meth:`create` checks again as it files)."""
        with self._connect() as db:
            self._within_day(db, username, limit, time.time())

    @staticmethod
    def _event(
        db: sa.Connection, rid: str, actor: str, type_: str, data: dict[str, Any], ts: float | None = None
    ) -> None:
        if type_ not in EVENT_TYPES:
            raise StoreError(f"unknown event type {type_!r}")
        db.execute(
            sa.text("INSERT INTO events (request_id, ts, actor, type, data) VALUES (:rid, :ts, :actor, :type, :data)"),
            {
                "rid": rid,
                "ts": ts or time.time(),
                "actor": actor,
                "type": type_,
                "data": json.dumps(data, sort_keys=True, default=str),
            },
        )

    def _get(self, db: sa.Connection, rid: str) -> Request:
        row = db.execute(sa.text("SELECT * FROM requests WHERE id = :id"), {"id": rid}).first()
        if row is None:
            raise StoreError(f"no airlock request {rid!r}")
        return _row_request(row)

    def get(self, rid: str) -> Request:
        with self._connect() as db:
            return self._get(db, rid)

    def transition(
        self,
        rid: str,
        new_state: str,
        *,
        actor: str,
        data: dict[str, Any] | None = None,
        file: ReleasedFile | None = None,
    ) -> Request:
        """Move a request to ``new_state`` (checked by :func:`review.check_transition`) and record it; with
        ``file``, in the same transaction, the request's file becomes that one (a blob already stored)."""
        with self._transaction() as db:
            req = self._get(db, rid)
            review.check_transition(req.state, new_state)
            now = time.time()
            db.execute(
                sa.text("UPDATE requests SET state = :state, updated = :now WHERE id = :id"),
                {"state": new_state, "now": now, "id": rid},
            )
            event = {"from": req.state, "to": new_state, **(data or {})}
            if file is not None:
                db.execute(
                    sa.text(
                        "UPDATE requests SET filename = :filename, sha256 = :sha256, size = :size, meta = :meta "
                        "WHERE id = :id"
                    ),
                    {
                        "filename": file.filename,
                        "sha256": file.sha256,
                        "size": file.size,
                        "meta": json.dumps(file.meta, sort_keys=True),
                        "id": rid,
                    },
                )
                event["file"] = {"sha256": file.sha256, "size": file.size, "replaces": req.sha256}
            self._event(db, rid, actor, "state", event, now)
        return self.get(rid)

    def record_checks(self, rid: str, results: list[dict[str, Any]], *, actor: str = "airlock") -> None:
        with self._transaction() as db:
            self._get(db, rid)
            for r in results:
                self._event(db, rid, actor, "check", r)

    def decide(
        self,
        rid: str,
        *,
        reviewer: str,
        action: str,
        comment: str,
        may_review: bool,
        approvals_needed: int,
        override: str = "",
        confirm_override: bool = False,
        before_commit: Callable[[review.Decision], None] | None = None,
    ) -> review.Decision:
        """Record a steward's decision; the rules (:func:`review.decide`) run inside the transaction, with the
        failed checks and an earlier approval's override read in it too. ``before_commit(decision)`` runs
        last inside the transaction: if it raises, the decision is not recorded."""
        with self._transaction() as db:
            req = self._get(db, rid)
            approvals = self._approvals(db, rid)
            decision = review.decide(
                state=req.state,
                requester=req.username,
                reviewer=reviewer,
                action=action,
                comment=comment,
                may_review=may_review,
                earlier_approvers=[a for a, _ in approvals],
                approvals_needed=approvals_needed,
                failed_checks=self._failed_checks(db, rid),
                override=override,
                earlier_override=next((o for _, o in approvals if o), ""),
                confirm_override=confirm_override,
            )
            now = time.time()
            self._event(
                db,
                rid,
                reviewer,
                "decision",
                {
                    "action": action,
                    "comment": comment.strip(),
                    "approvals": decision.approvals,
                    "needed": decision.needed,
                    **({"override": decision.override} if decision.override else {}),
                    **({"confirms_override": decision.confirms} if decision.confirms else {}),
                },
                now,
            )
            if decision.new_state is not None:
                review.check_transition(req.state, decision.new_state)
                db.execute(
                    sa.text("UPDATE requests SET state = :state, updated = :now WHERE id = :id"),
                    {"state": decision.new_state, "now": now, "id": rid},
                )
                self._event(db, rid, reviewer, "state", {"from": req.state, "to": decision.new_state}, now)
            if before_commit is not None:
                before_commit(decision)
        return decision

    @staticmethod
    def _approvals(db: sa.Connection, rid: str) -> list[tuple[str, str]]:
        """``(approver, override reason or "")`` of each approval so far, in order."""
        rows = db.execute(
            sa.text("SELECT actor, data FROM events WHERE request_id = :id AND type = 'decision' ORDER BY seq"),
            {"id": rid},
        ).all()
        decisions = [(r.actor, json.loads(r.data)) for r in rows]
        return [(actor, str(d.get("override", ""))) for actor, d in decisions if d.get("action") == "approve"]

    @staticmethod
    def _failed_checks(db: sa.Connection, rid: str) -> list[str]:
        """The checks of the latest run that failed."""
        rows = db.execute(
            sa.text("SELECT type, data FROM events WHERE request_id = :id AND type IN ('state', 'check') ORDER BY seq"),
            {"id": rid},
        ).all()
        failed: list[str] = []
        for r in rows:
            data = json.loads(r.data)
            if r.type == "state" and data.get("to") == review.CHECKING:
                failed = []
            elif r.type == "check" and data.get("status") == "fail":
                failed.append(str(data.get("check")))
        return failed

    def overridden(self, ids: list[str]) -> set[str]:
        """Which of ``ids`` were approved over failed checks (for the review list)."""
        if not ids:
            return set()
        with self._connect() as db:
            rows = db.execute(
                sa.text(
                    "SELECT request_id, data FROM events WHERE type = 'decision' AND request_id IN :ids"
                ).bindparams(sa.bindparam("ids", expanding=True)),
                {"ids": list(ids)},
            ).all()
        return {r.request_id for r in rows if json.loads(r.data).get("override")}

    def record_download(self, rid: str, *, actor: str, data: dict[str, Any]) -> None:
        with self._transaction() as db:
            req = self._get(db, rid)
            if req.state != review.RELEASED:
                raise StoreError(f"request {rid} is {req.state}, not released; it cannot be downloaded")
            self._event(db, rid, actor, "download", data)

    def record_preview(self, rid: str, *, actor: str, data: dict[str, Any]) -> None:
        """That ``actor`` was shown a page of the request's table (``data``: where the page starts), or the
        listing of its graph (``data["graph"]``)."""
        with self._transaction() as db:
            self._get(db, rid)
            self._event(db, rid, actor, "preview", data)

    def read_graph(self, rid: str, username: str, sha256: str) -> bool:
        """Was ``username`` shown the graph listing of request ``rid`` (its file ``sha256``) on its page."""
        return any(
            e.actor == username and e.data.get("sha256") == sha256 and e.data.get("graph") is True
            for e in self.events(rid, "preview")
        )

    def graph_event(
        self, rid: str, *, actor: str, data: dict[str, Any], before_commit: Callable[[], None] | None = None
    ) -> None:
        """Record a steward's approval or revocation of a graph (``data``: ``action``, ``graph_sha256``,
        ``reason``) on the request they gave it on; ``before_commit()`` runs in the transaction (the audit
        record: if it raises, nothing is recorded)."""
        with self._transaction() as db:
            self._get(db, rid)
            self._event(db, rid, actor, "graph", data)
            if before_commit is not None:
                before_commit()

    def graph_approvals(self, project: str, sha256: str) -> list[Event]:
        """The stewards' approvals of graph ``sha256`` in ``project`` since its last revocation, one per
        steward (the first), oldest first."""
        with self._connect() as db:
            rows = db.execute(
                sa.text(
                    "SELECT e.* FROM events e JOIN requests r ON r.id = e.request_id WHERE r.project = :p "
                    "AND e.type = 'graph' ORDER BY e.seq"
                ),
                {"p": project},
            ).fetchall()
        current: list[Event] = []
        for row in rows:
            event = _row_event(row)
            if event.data.get("graph_sha256") != sha256:
                continue
            if event.data.get("action") == "revoke":
                current = []
            elif event.data.get("action") == "approve" and all(e.actor != event.actor for e in current):
                current.append(event)
        return current

    def events(self, rid: str, type_: str | None = None) -> list[Event]:
        q = (
            "SELECT * FROM events WHERE request_id = :id AND type = :type ORDER BY seq"
            if type_
            else "SELECT * FROM events WHERE request_id = :id ORDER BY seq"
        )
        with self._connect() as db:
            return [_row_event(r) for r in db.execute(sa.text(q), {"id": rid, "type": type_})]

    def checks(self, rid: str) -> list[dict[str, Any]]:
        """The results of the latest check run (a re-run after a restart replaces earlier partial ones)."""
        out: list[dict[str, Any]] = []
        for e in self.events(rid):
            if e.type == "state" and e.data.get("to") == review.CHECKING:
                out = []
            elif e.type == "check":
                out.append(e.data)
        return out

    def automatic_releases(self, username: str, project: str, since: float) -> list[float]:
        """When each of ``username``'s requests in ``project`` was released without a steward after ``since``,
        oldest first."""
        with self._connect() as db:
            rows = db.execute(
                sa.text(
                    "SELECT e.ts, e.data FROM events e JOIN requests r ON r.id = e.request_id WHERE r.username = :u "
                    "AND r.project = :p AND r.state = :released AND e.type = 'state' AND e.ts > :since ORDER BY e.ts"
                ),
                {"u": username, "p": project, "released": review.RELEASED, "since": since},
            ).fetchall()
        out = []
        for ts, data in rows:
            event = json.loads(data)
            if event.get("to") == review.RELEASED and event.get("automatic") is True:
                out.append(float(ts))
        return out

    def counts(self) -> dict[tuple[str, str], int]:
        """How many requests there are in each state, per kind."""
        with self._connect() as db:
            rows = db.execute(sa.text("SELECT state, kind, COUNT(*) FROM requests GROUP BY state, kind")).fetchall()
        return {(r[0], r[1]): int(r[2]) for r in rows}

    def oldest_in(self, state: str) -> float | None:
        """When the request that has been in ``state`` longest got there (its last change), or None."""
        with self._connect() as db:
            row = db.execute(
                sa.text("SELECT MIN(updated) FROM requests WHERE state = :state"), {"state": state}
            ).first()
        return None if row is None or row[0] is None else float(row[0])

    def list(
        self, *, projects: list[str] | None = None, username: str | None = None, states_: list[str] | None = None
    ) -> list[Request]:
        """Requests matching all given filters (``projects``/``username`` are OR-ed: either matches)."""
        where: list[str] = []
        who: list[str] = []
        expanding: list[str] = []
        if projects is not None:
            who.append("project IN :projects" if projects else "1 = 0")
            expanding.append("projects")
        if username is not None:
            who.append("username = :username")
        if who:
            where.append("(" + " OR ".join(who) + ")")
        if states_:
            where.append("state IN :states")
            expanding.append("states")
        # Only fixed column names and bind parameters are joined here; every value goes in as a parameter.
        q = "SELECT * FROM requests" + (" WHERE " + " AND ".join(where) if where else "")  # noqa: S608
        statement = sa.text(q + " ORDER BY created DESC").bindparams(
            *(sa.bindparam(name, expanding=True) for name in expanding if f":{name}" in q)
        )
        params = {"projects": list(projects or []), "username": username, "states": list(states_ or [])}
        with self._connect() as db:
            return [_row_request(r) for r in db.execute(statement, params)]
