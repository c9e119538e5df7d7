"""The privacy-budget ledger's storage: one table of runs (reservations) and one of steward overrides.

SQLite by default, at ``<state_dir>/ledger/ledger.sqlite3`` (directory 0700, file 0600, root only), in
WAL mode with ``synchronous=FULL``: a transaction that returned is on disk, and a process killed
mid-write leaves the last committed state. Every change runs in one ``BEGIN IMMEDIATE`` transaction
that first reads the dataset's usage and then writes, so concurrent reservations are serialised and
can never together exceed a budget.

A PostgreSQL URL (``postgresql://...``) selects PostgreSQL instead (needs the ``psycopg`` package);
the SQL is the same, writes take ``LOCK TABLE ... IN SHARE ROW EXCLUSIVE MODE`` for the same
serialisation.

Budget arithmetic lives in :mod:`paitient.rules.budget`; this module only stores and fetches.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from paitient.config import Budget
from paitient.rules.budget import (
    BudgetExceeded,
    Entry,
    check_amounts,
    check_reserve,
    check_settle,
    left,
    usage,
)

__all__ = ["BudgetExceeded", "Ledger", "LedgerError", "db_path", "RECORD_FIELDS"]

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
RECORD_FIELDS = frozenset(
    {
        "dataset",
        "dataset_version",
        "epsilon",
        "delta",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "planned_steps",
        "epochs",
        "max_grad_norm",
        "mode",
        "accountant",
        "weights_sha256",
        "model",
        "started",
        "finished",
        "batch_size",
        "dataset_size",
        "loss_reduction",
        "note",
    }
)
"""Keys a training record may carry (see docs/privacy.md for their meaning)."""
MAX_RECORD_BYTES = 16384

SCHEMA = (
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

RUN_COLUMNS = (
    "id",
    "project",
    "dataset",
    "username",
    "run_id",
    "pid",
    "pid_start",
    "epsilon",
    "delta",
    "state",
    "epsilon_spent",
    "delta_spent",
    "created",
    "closed",
    "record",
    "weights_sha256",
)
_SELECT_RUNS = "SELECT " + ", ".join(RUN_COLUMNS) + " FROM runs"  # noqa: S608 -- fixed column names


class LedgerError(ValueError):
    """A ledger operation was refused; ``code`` is machine-readable, the message says what to do."""

    def __init__(self, message: str, code: str = "refused"):
        super().__init__(message)
        self.code = code


def db_path(site) -> Path:
    return Path(site.state_dir) / "ledger" / "ledger.sqlite3"


class _SQLite:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(path, 0o600)
        with contextlib.closing(self._connect()) as c:
            c.execute("PRAGMA journal_mode=WAL")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=60, check_same_thread=False)
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=60000")
        return conn

    @contextlib.contextmanager
    def transaction(self, write: bool) -> Iterator[Callable[..., list[tuple]]]:
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield lambda sql, params=(): conn.execute(sql, params).fetchall()
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()


class _Postgres:
    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError:
            raise LedgerError(
                "the ledger is configured with a PostgreSQL URL but the psycopg package is not "
                "installed; install psycopg or leave the URL empty for SQLite",
                "unavailable",
            ) from None
        self._psycopg = psycopg
        self.url = url

    @contextlib.contextmanager
    def transaction(self, write: bool) -> Iterator[Callable[..., list[tuple]]]:
        with self._psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("BEGIN")
            try:
                if write:
                    conn.execute("LOCK TABLE runs IN SHARE ROW EXCLUSIVE MODE")

                def query(sql: str, params: tuple = ()) -> list[tuple]:
                    cur = conn.execute(sql.replace("?", "%s"), params)
                    return cur.fetchall() if cur.description else []

                yield query
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")


def _row(values: tuple) -> dict[str, Any]:
    row = dict(zip(RUN_COLUMNS, values, strict=True))
    row["record"] = json.loads(row["record"]) if row["record"] else None
    return row


def _entry(row: dict[str, Any]) -> Entry:
    return Entry(row["state"], row["epsilon"], row["delta"], row["epsilon_spent"], row["delta_spent"])


def check_record(record: dict[str, Any]) -> str:
    """Validate a training record and return it as JSON; raise :class:`LedgerError` saying what is wrong."""
    if not isinstance(record, dict):
        raise LedgerError("record must be a JSON object", "bad_request")
    unknown = sorted(set(record) - RECORD_FIELDS)
    if unknown:
        raise LedgerError(
            f"unknown record field(s) {', '.join(unknown)}; known: {', '.join(sorted(RECORD_FIELDS))}",
            "bad_request",
        )
    for key, value in record.items():
        if not (value is None or isinstance(value, str | int | float | bool)):
            raise LedgerError(f"record field {key!r} must be a string, number or null", "bad_request")
    sha = record.get("weights_sha256")
    if sha is not None and not (isinstance(sha, str) and SHA256_RE.match(sha)):
        raise LedgerError("weights_sha256 must be 64 lower-case hex digits", "bad_request")
    text = json.dumps(record, sort_keys=True)
    if len(text) > MAX_RECORD_BYTES:
        raise LedgerError(f"record larger than {MAX_RECORD_BYTES} bytes", "bad_request")
    return text


class Ledger:
    """The ledger of one site. Thread-safe: every call opens its own connection and transaction."""

    def __init__(self, site, url: str | None = None):
        self.site = site
        url = getattr(site.workspace, "ledger_url", "") if url is None else url
        self.db = _Postgres(url) if url.startswith(("postgres://", "postgresql://")) else _SQLite(db_path(site))
        with self.db.transaction(write=False) as q:  # (PostgreSQL's write lock needs the table first)
            for stmt in SCHEMA:
                q(stmt)

    # -- budgets ---------------------------------------------------------------------------------

    def _check_dataset(self, project: str, dataset: str):
        try:
            proj = self.site.project(project)
        except KeyError as e:
            raise LedgerError(str(e.args[0]), "unknown_project") from None
        if dataset not in proj.datasets:
            raise LedgerError(
                f"project {project!r} has no dataset {dataset!r}; its datasets: {', '.join(proj.datasets) or 'none'}",
                "unknown_dataset",
            )
        return proj

    def _total(self, q, project: str, dataset: str) -> tuple[Budget, str]:
        proj = self._check_dataset(project, dataset)
        rows = q("SELECT epsilon, delta FROM budget_overrides WHERE project = ? AND dataset = ?", (project, dataset))
        if rows:
            return Budget(epsilon=rows[0][0], delta=rows[0][1]), "steward"
        return proj.budget_for(dataset), "site"

    def total_for(self, project: str, dataset: str) -> Budget:
        with self.db.transaction(write=False) as q:
            return self._total(q, project, dataset)[0]

    def set_budget(self, project: str, dataset: str, epsilon: float, delta: float, *, by: str) -> None:
        """Record a steward's total for one dataset, replacing the site configuration's."""
        try:
            check_amounts(epsilon, delta)
        except ValueError as e:
            raise LedgerError(str(e), "bad_request") from None
        if delta <= 0:
            raise LedgerError("a total delta must be positive", "bad_request")
        self._check_dataset(project, dataset)
        with self.db.transaction(write=True) as q:
            q(
                "INSERT INTO budget_overrides (project, dataset, epsilon, delta, set_by, set_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (project, dataset) DO UPDATE SET "
                "epsilon = excluded.epsilon, delta = excluded.delta, set_by = excluded.set_by, "
                "set_at = excluded.set_at",
                (project, dataset, float(epsilon), float(delta), by, time.time()),
            )

    def clear_budget(self, project: str, dataset: str) -> None:
        """Drop a steward override: the site configuration's total applies again."""
        with self.db.transaction(write=True) as q:
            q("DELETE FROM budget_overrides WHERE project = ? AND dataset = ?", (project, dataset))

    def budget(self, project: str) -> list[dict[str, Any]]:
        """Per dataset of ``project``: total, spent, reserved and left, for epsilon and delta."""
        try:
            proj = self.site.project(project)
        except KeyError as e:
            raise LedgerError(str(e.args[0]), "unknown_project") from None
        out = []
        with self.db.transaction(write=False) as q:
            for ds in proj.datasets:
                total, source = self._total(q, project, ds)
                rows = [_row(r) for r in q(_SELECT_RUNS + " WHERE project = ? AND dataset = ?", (project, ds))]
                used = usage(_entry(r) for r in rows)
                eps_left, delta_left = left(total, used)
                out.append(
                    {
                        "project": project,
                        "dataset": ds,
                        "source": source,
                        "epsilon_total": total.epsilon,
                        "delta_total": total.delta,
                        "epsilon_spent": used.spent_epsilon,
                        "delta_spent": used.spent_delta,
                        "epsilon_reserved": used.reserved_epsilon,
                        "delta_reserved": used.reserved_delta,
                        "epsilon_left": eps_left,
                        "delta_left": delta_left,
                        "runs": len(rows),
                    }
                )
        return out

    # -- runs ------------------------------------------------------------------------------------

    def reserve(
        self,
        project: str,
        dataset: str,
        epsilon: float,
        delta: float,
        *,
        user: str,
        run_id: str = "",
        pid: int = 0,
        pid_start: int | None = None,
    ) -> str:
        """Reserve ``(epsilon, delta)`` of a dataset's budget for one run; return the reservation id.

        Raises :class:`BudgetExceeded` with the numbers when it does not fit.
        """
        try:
            check_amounts(epsilon, delta)
        except ValueError as e:
            raise LedgerError(str(e), "bad_request") from None
        rid = uuid.uuid4().hex
        with self.db.transaction(write=True) as q:
            total, _ = self._total(q, project, dataset)
            rows = q(
                "SELECT state, epsilon, delta, epsilon_spent, delta_spent FROM runs WHERE project = ? AND dataset = ?",
                (project, dataset),
            )
            check_reserve(f"{project}/{dataset}", total, usage(Entry(*r) for r in rows), epsilon, delta)
            q(
                "INSERT INTO runs (id, project, dataset, username, run_id, pid, pid_start, epsilon, delta, "
                "state, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'reserved', ?)",
                (rid, project, dataset, user, run_id, int(pid), pid_start, float(epsilon), float(delta), time.time()),
            )
        return rid

    def settle(
        self,
        reservation: str,
        epsilon_spent: float,
        record: dict[str, Any] | None = None,
        *,
        delta_spent: float | None = None,
        user: str | None = None,
    ) -> dict[str, Any]:
        """Close a run with what its accountant says it spent and its training record; return its row.

        The rest of the reservation is released.
        ``delta_spent`` defaults to the reserved delta (a run that took any step spent its delta),
        or 0 when ``epsilon_spent`` is 0 (no step, nothing learnt). ``user``, when given, must be the
        user who reserved.
        """
        record_json = check_record(record or {})
        with self.db.transaction(write=True) as q:
            rows = q(_SELECT_RUNS + " WHERE id = ?", (reservation,))
            if not rows:
                raise LedgerError(f"no reservation {reservation!r} in the ledger", "unknown_reservation")
            row = _row(rows[0])
            if user is not None and row["username"] != user:
                raise LedgerError("this reservation belongs to another user", "forbidden")
            if row["state"] != "reserved":
                raise LedgerError(
                    f"reservation {reservation} is already {row['state']}"
                    + (" (its kernel had ended; it counts in full)" if row["state"] == "lost" else ""),
                    "closed",
                )
            if delta_spent is None:
                delta_spent = row["delta"] if epsilon_spent > 0 else 0.0
            try:
                check_settle(row["epsilon"], row["delta"], epsilon_spent, delta_spent)
            except ValueError as e:
                raise LedgerError(str(e), "over_reservation") from None
            q(
                "UPDATE runs SET state = 'settled', epsilon_spent = ?, delta_spent = ?, closed = ?, "
                "record = ?, weights_sha256 = ? WHERE id = ?",
                (
                    float(epsilon_spent),
                    float(delta_spent),
                    time.time(),
                    record_json,
                    (record or {}).get("weights_sha256"),
                    reservation,
                ),
            )
            return _row(q(_SELECT_RUNS + " WHERE id = ?", (reservation,))[0])

    def mark_lost(self, alive: Callable[[int, int | None], bool]) -> list[str]:
        """Mark open reservations whose process is gone as lost (counted in full); return their ids."""
        with self.db.transaction(write=True) as q:
            open_rows = q("SELECT id, pid, pid_start FROM runs WHERE state = 'reserved'")
            gone = [rid for rid, pid, start in open_rows if not alive(pid, start)]
            now = time.time()
            for rid in gone:
                q("UPDATE runs SET state = 'lost', closed = ? WHERE id = ? AND state = 'reserved'", (now, rid))
        return gone

    def runs(self, project: str | None = None, dataset: str | None = None) -> list[dict[str, Any]]:
        """Runs in order of reservation, optionally for one project (and dataset)."""
        sql = _SELECT_RUNS
        params: tuple[str, ...] = ()
        if project is not None:
            sql, params = sql + " WHERE project = ?", (project,)
            if dataset is not None:
                sql, params = sql + " AND dataset = ?", (project, dataset)
        with self.db.transaction(write=False) as q:
            return [_row(r) for r in q(sql + " ORDER BY created, id", params)]

    def run_counts(self) -> dict[tuple[str, str], int]:
        """How many runs each project has in each state (``reserved``: open, ``settled``, ``lost``)."""
        with self.db.transaction(write=False) as q:
            rows = q("SELECT project, state, COUNT(*) FROM runs GROUP BY project, state")
        return {(project, state): int(n) for project, state, n in rows}

    def run(self, reservation: str) -> dict[str, Any] | None:
        with self.db.transaction(write=False) as q:
            rows = q(_SELECT_RUNS + " WHERE id = ?", (reservation,))
        return _row(rows[0]) if rows else None

    def record_by_hash(self, sha256: str) -> dict[str, Any] | None:
        """The settled run whose saved weights have this SHA-256 (the latest, if several), or None."""
        sha256 = sha256.lower()
        if not SHA256_RE.match(sha256):
            raise LedgerError("a SHA-256 is 64 hex digits", "bad_request")
        with self.db.transaction(write=False) as q:
            rows = q(
                _SELECT_RUNS + " WHERE weights_sha256 = ? AND state = 'settled' ORDER BY closed DESC LIMIT 1", (sha256,)
            )
        return _row(rows[0]) if rows else None
