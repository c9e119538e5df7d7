"""The privacy-budget ledger's storage: one table of runs (reservations) and one of steward overrides.

SQLite by default, at ``<state_dir>/ledger/ledger.sqlite3`` (directory 0700, file 0600, root only), in
WAL mode with ``synchronous=FULL``: a transaction that returned is on disk, and a process killed
mid-write leaves the last committed state. With ``[database] url`` the tables live in the schema
``ledger`` of that PostgreSQL database (see :mod:`paitient.services.kit.db`; the deprecated
``[workspace] ledger_url`` keeps them in that database's default schema). Every change runs in one write
transaction that first reads the dataset's usage and then writes: ``BEGIN IMMEDIATE`` on SQLite,
``LOCK TABLE ... IN SHARE ROW EXCLUSIVE MODE`` on PostgreSQL, so concurrent reservations are serialised
and can never together exceed a budget. A third table keeps the audit records the trail could not take
until it can (``Ledger.held``). The tables are made and upgraded by the migrations in
``migrations/versions``.

Budget arithmetic lives in :mod:`paitient.rules.budget`; this module only stores and fetches.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from paitient.config import Budget
from paitient.rules.budget import (
    BudgetExceeded,
    Entry,
    check_amounts,
    check_member_share,
    check_reserve,
    check_settle,
    left,
    member_left,
    usage,
)
from paitient.services.kit.backlog import HeldRecords
from paitient.services.kit.db import Database, Location

__all__ = ["BudgetExceeded", "Ledger", "LedgerError", "db_path", "RECORD_FIELDS"]

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
JOB_RUN_PREFIX = "job:"
MAX_OPEN_PER_MEMBER = 64
"""Reservations one member may hold unsettled at once, over all projects: the ledger looks at each open one
(is its process alive?) before each reservation, under its write lock, so that one account holding many
thousands slowed every account's calls. A workspace's kernels (8 per account) and jobs (4) hold far fewer."""
TOO_MANY_RESERVATIONS = "too_many_reservations"
"""The run id of a training job's reservation: this prefix and the job's id. Kernels may not use it."""
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
OVERRIDE_COLUMNS = ("project", "dataset", "epsilon", "delta", "set_by", "set_at")
MIGRATIONS = Path(__file__).parent / "migrations"
ROW_COLUMNS = (*RUN_COLUMNS, "pod")
"""A run as the store gives it: the first revision's columns (:data:`RUN_COLUMNS`) and those added since."""
_SELECT_RUNS = "SELECT " + ", ".join(ROW_COLUMNS) + " FROM runs"  # noqa: S608 -- fixed column names


class LedgerError(ValueError):
    """A ledger operation was refused; ``code`` is machine-readable, the message says what to do."""

    def __init__(self, message: str, code: str = "refused"):
        super().__init__(message)
        self.code = code


def db_path(site) -> Path:
    return Path(site.state_dir) / "ledger" / "ledger.sqlite3"


def _database(site, url: str | None) -> Database:
    where = Location.for_site(site, "ledger", db_path(site))
    if url is not None:
        where = Location(db_path(site), url, None, "") if url else Location(db_path(site))
    if not where.postgres:
        where.sqlite_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(where.sqlite_path.parent, 0o700)
    return Database(
        where,
        what="ledger",
        migrations=MIGRATIONS,
        tables={"runs": RUN_COLUMNS, "budget_overrides": OVERRIDE_COLUMNS},
        moved_from_public=True,
    )


Query = Callable[..., list[tuple]]


@contextlib.contextmanager
def _queries(db: Database, write: bool) -> Iterator[Query]:
    """``q(sql, **params)`` -> rows, all in one transaction of ``db``."""
    with db.transaction(write) as conn:

        def q(sql: str, **params: Any) -> list[tuple]:
            result = conn.execute(sa.text(sql), params)
            return [tuple(r) for r in result] if result.returns_rows else []

        yield q


def _row(values: tuple) -> dict[str, Any]:
    row = dict(zip(ROW_COLUMNS, values, strict=True))
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
        """The ledger of ``site``, where its site file says (``url``: this PostgreSQL URL instead, in the
        database's default schema; "": SQLite)."""
        self.site = site
        self.db = _database(site, url)
        self.held = HeldRecords(self.db)
        """The audit records the trail could not take yet (:mod:`paitient.services.kit.backlog`)."""

    def close(self) -> None:
        self.db.close()

    # -- budgets ---------------------------------------------------------------------------------

    def check_dataset(self, project: str, dataset: str):
        """The project of ``dataset``; :class:`LedgerError` when the site has no such project or dataset."""
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
        proj = self.check_dataset(project, dataset)
        rows = q(
            "SELECT epsilon, delta FROM budget_overrides WHERE project = :project AND dataset = :dataset",
            project=project,
            dataset=dataset,
        )
        if rows:
            return Budget(epsilon=rows[0][0], delta=rows[0][1]), "steward"
        return proj.budget_for(dataset), "site"

    def total_for(self, project: str, dataset: str) -> Budget:
        with _queries(self.db, write=False) as q:
            return self._total(q, project, dataset)[0]

    def check_budget(self, project: str, dataset: str, epsilon: float, delta: float) -> None:
        """Raise :class:`LedgerError` unless :meth:`set_budget` would take these values."""
        try:
            check_amounts(epsilon, delta)
        except ValueError as e:
            raise LedgerError(str(e), "bad_request") from None
        if delta <= 0:
            raise LedgerError("a total delta must be positive", "bad_request")
        self.check_dataset(project, dataset)

    def set_budget(self, project: str, dataset: str, epsilon: float, delta: float, *, by: str) -> None:
        """Record a steward's total for one dataset, replacing the site configuration's."""
        self.check_budget(project, dataset, epsilon, delta)
        with _queries(self.db, write=True) as q:
            q(
                "INSERT INTO budget_overrides (project, dataset, epsilon, delta, set_by, set_at) "
                "VALUES (:project, :dataset, :epsilon, :delta, :by, :at) ON CONFLICT (project, dataset) DO UPDATE "
                "SET epsilon = excluded.epsilon, delta = excluded.delta, set_by = excluded.set_by, "
                "set_at = excluded.set_at",
                project=project,
                dataset=dataset,
                epsilon=float(epsilon),
                delta=float(delta),
                by=by,
                at=time.time(),
            )

    def clear_budget(self, project: str, dataset: str) -> None:
        """Drop a steward override: the site configuration's total applies again."""
        self.check_dataset(project, dataset)
        with _queries(self.db, write=True) as q:
            q(
                "DELETE FROM budget_overrides WHERE project = :project AND dataset = :dataset",
                project=project,
                dataset=dataset,
            )

    def budget(self, project: str, member: str | None = None) -> list[dict[str, Any]]:
        """Per dataset of ``project``: total, spent, reserved and left, for epsilon and delta; the project's
        ``member_share``; and with ``member``, the epsilon still open to that member (``epsilon_left_member``:
        what is left, within what is left of her share)."""
        try:
            proj = self.site.project(project)
        except KeyError as e:
            raise LedgerError(str(e.args[0]), "unknown_project") from None
        out = []
        with _queries(self.db, write=False) as q:
            for ds in proj.datasets:
                total, source = self._total(q, project, ds)
                rows = [
                    _row(r)
                    for r in q(
                        _SELECT_RUNS + " WHERE project = :project AND dataset = :dataset", project=project, dataset=ds
                    )
                ]
                used = usage(_entry(r) for r in rows)
                eps_left, delta_left = left(total, used)
                mine: dict[str, float] = {}
                if member is not None:
                    own = usage(_entry(r) for r in rows if r["username"] == member)
                    mine["epsilon_left_member"] = min(eps_left, member_left(proj.member_share, total, own))
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
                        "member_share": proj.member_share,
                        **mine,
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
        pod: str = "",
    ) -> str:
        """Reserve ``(epsilon, delta)`` of a dataset's budget for one run; return the reservation id.

        Raises :class:`BudgetExceeded` with the numbers when it does not fit.
        """
        try:
            check_amounts(epsilon, delta)
        except ValueError as e:
            raise LedgerError(str(e), "bad_request") from None
        rid = uuid.uuid4().hex
        with _queries(self.db, write=True) as q:
            total, _ = self._total(q, project, dataset)
            rows = q(
                "SELECT state, epsilon, delta, epsilon_spent, delta_spent, username FROM runs "
                "WHERE project = :project AND dataset = :dataset",
                project=project,
                dataset=dataset,
            )
            check_reserve(f"{project}/{dataset}", total, usage(Entry(*r[:5]) for r in rows), epsilon, delta)
            mine = usage(Entry(*r[:5]) for r in rows if r[5] == user)
            share = self.site.project(project).member_share
            check_member_share(f"{project}/{dataset}", user, share, total, mine, epsilon, delta)
            ((open_,),) = q("SELECT COUNT(*) FROM runs WHERE username = :user AND state = 'reserved'", user=user)
            if int(open_) >= MAX_OPEN_PER_MEMBER:
                raise LedgerError(
                    f"you hold {open_} reservations not yet settled, the most one member may hold at once; "
                    "finish or interrupt the trainings that hold them (a kernel's end settles its own), then "
                    "reserve again",
                    TOO_MANY_RESERVATIONS,
                )
            q(
                "INSERT INTO runs (id, project, dataset, username, run_id, pid, pid_start, pod, epsilon, delta, "
                "state, created) VALUES (:id, :project, :dataset, :user, :run_id, :pid, :pid_start, :pod, "
                ":epsilon, :delta, 'reserved', :created)",
                id=rid,
                project=project,
                dataset=dataset,
                user=user,
                run_id=run_id,
                pid=int(pid),
                pid_start=pid_start,
                pod=pod,
                epsilon=float(epsilon),
                delta=float(delta),
                created=time.time(),
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
        with _queries(self.db, write=True) as q:
            rows = q(_SELECT_RUNS + " WHERE id = :id", id=reservation)
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
            sha = (record or {}).get("weights_sha256")
            if sha and not str(row["run_id"]).startswith(JOB_RUN_PREFIX):
                # A job's weights are settled by the runner alone: a kernel's run that claimed them would
                # stand beside the job's settlement, as if the weights had been trained twice.
                jobs = q(
                    "SELECT 1 FROM runs WHERE weights_sha256 = :sha AND state = 'settled' "
                    "AND substr(run_id, 1, :n) = :job",
                    sha=sha,
                    job=JOB_RUN_PREFIX,
                    n=len(JOB_RUN_PREFIX),
                )
                if jobs:
                    raise LedgerError(
                        "these weights are a training job's, settled by the runner; a run of your own settles the "
                        "hash of weights it trained itself",
                        "bad_request",
                    )
                # Nor another member's: the airlock reads the latest run of a hash, and a colleague's tiny run
                # settled with the hash (every member reads the project's records) stood in for the weights'
                # own training record, in another project too.
                theirs = q(
                    "SELECT 1 FROM runs WHERE weights_sha256 = :sha AND state = 'settled' AND username <> :user",
                    sha=sha,
                    user=row["username"],
                )
                if theirs:
                    raise LedgerError(
                        "these weights are another member's, settled with her run; a run of your own settles the "
                        "hash of weights it trained itself",
                        "bad_request",
                    )
            try:
                check_settle(row["epsilon"], row["delta"], epsilon_spent, delta_spent)
            except ValueError as e:
                raise LedgerError(str(e), "over_reservation") from None
            q(
                "UPDATE runs SET state = 'settled', epsilon_spent = :epsilon, delta_spent = :delta, "
                "closed = :closed, record = :record, weights_sha256 = :sha WHERE id = :id",
                epsilon=float(epsilon_spent),
                delta=float(delta_spent),
                closed=time.time(),
                record=record_json,
                sha=(record or {}).get("weights_sha256"),
                id=reservation,
            )
            return _row(q(_SELECT_RUNS + " WHERE id = :id", id=reservation)[0])

    def mark_lost(
        self,
        alive: Callable[[int, int | None], bool],
        pod_alive: Callable[[str, int, int | None], bool] | None = None,
        leased: Callable[[str], bool] | None = None,
    ) -> list[str]:
        """Mark open reservations whose process is gone as lost (counted in full); return their ids. A
        reservation made from a pod is alive while ``pod_alive(pod, pid, start)`` says so; one whose process
        the ledger could not see (pid 0, no pod) while ``leased(id)`` says so (without them: gone)."""

        def still(rid: str, pid: int, start: int | None, pod: str | None) -> bool:
            if pod:
                return pod_alive is not None and pod_alive(pod, pid, start)
            if pid == 0:
                return leased is not None and leased(rid)
            return alive(pid, start)

        with _queries(self.db, write=True) as q:
            open_rows = q("SELECT id, pid, pid_start, pod FROM runs WHERE state = 'reserved'")
            gone = [rid for rid, pid, start, pod in open_rows if not still(rid, pid, start, pod)]
            now = time.time()
            for rid in gone:
                q(
                    "UPDATE runs SET state = 'lost', closed = :now WHERE id = :id AND state = 'reserved'",
                    now=now,
                    id=rid,
                )
        return gone

    def runs(self, project: str | None = None, dataset: str | None = None) -> list[dict[str, Any]]:
        """Runs in order of reservation, optionally for one project (and dataset)."""
        sql = _SELECT_RUNS
        if project is not None:
            sql += " WHERE project = :project"
            if dataset is not None:
                sql += " AND dataset = :dataset"
        with _queries(self.db, write=False) as q:
            return [_row(r) for r in q(sql + " ORDER BY created, id", project=project, dataset=dataset)]

    def run_counts(self) -> dict[tuple[str, str], int]:
        """How many runs each project has in each state (``reserved``: open, ``settled``, ``lost``)."""
        with _queries(self.db, write=False) as q:
            rows = q("SELECT project, state, COUNT(*) FROM runs GROUP BY project, state")
        return {(project, state): int(n) for project, state, n in rows}

    def run(self, reservation: str) -> dict[str, Any] | None:
        with _queries(self.db, write=False) as q:
            rows = q(_SELECT_RUNS + " WHERE id = :id", id=reservation)
        return _row(rows[0]) if rows else None

    def record_by_hash(self, sha256: str) -> dict[str, Any] | None:
        """The settled run whose saved weights have this SHA-256, or None: a training job's when there is one
        (settled by the runner alone), else the latest. A kernel's run cannot stand in for a job's weights."""
        sha256 = sha256.lower()
        if not SHA256_RE.match(sha256):
            raise LedgerError("a SHA-256 is 64 hex digits", "bad_request")
        with _queries(self.db, write=False) as q:
            rows = q(
                _SELECT_RUNS + " WHERE weights_sha256 = :sha AND state = 'settled' "
                "ORDER BY CASE WHEN substr(run_id, 1, :n) = :job THEN 0 ELSE 1 END, closed DESC LIMIT 1",
                sha=sha256,
                job=JOB_RUN_PREFIX,
                n=len(JOB_RUN_PREFIX),
            )
        return _row(rows[0]) if rows else None
