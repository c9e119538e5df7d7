"""The runner's queue: training jobs and their states, in a database, surviving a restart and a crash mid-write.

The ``jobs`` table is in ``<state_dir>/jobs/jobs.sqlite3`` (root 0600 in a 0700 folder; WAL, full synchronous
writes), or in the schema ``jobs`` of ``[database] url``'s PostgreSQL database; writers are serialised on
either (:mod:`paitient.services.kit.db`), and the table is made and upgraded by ``migrations/versions`` (a
``jobs.sqlite3`` from before the migrations is recognised and stamped). A job is ``queued`` when submitted,
``running`` while a worker has it, then ``done``, ``failed`` (with the reason) or ``cancelled``. Each change
is one transaction. A job that was ``running`` when the runner stopped (a crash, ``kill -9``) is marked
``failed`` at the next start, with that reason: its reservation belonged to the runner process that died,
so the ledger counts it in full. The model graph is kept beside the queue by its SHA-256
(``<state_dir>/jobs/graphs/<sha256>.json``, made once), the released files of a finished job in
``<state_dir>/jobs/out/<job id>/``: files on disk, whichever database holds the queue.

Bounds: an account has at most ``[jobs] max_per_user`` jobs queued or running at once; the count and the
new row are one write transaction, so submissions racing at the cap cannot both pass it, and the one over it
is refused with :class:`QueueFull` (a :class:`~paitient.channel.ChannelError`: the socket hands its message to
the researcher). A worker claims the queued job of the account with the fewest jobs running, then of the
account served longest ago (its latest start; never served first), then the oldest: with one worker, two
accounts' jobs alternate, whatever either has waiting. A graph is removed once no job that is queued, running
or ``done`` names it (a done job's graph is listed to the steward when its weights are requested, so it stays
with the job's released files); a failed or cancelled job's graph goes when the job ends, and at each start
what no such job names.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from paitient.channel import ChannelError
from paitient.config.outputs import Jobs as JobsSettings
from paitient.fsutil import create_once
from paitient.services.kit.db import Database, Location
from paitient.services.kit.secretfile import private_dirs

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL = ("done", "failed", "cancelled")
STOPPED_MID_JOB = "the runner stopped while the job ran; its reservation counts in full. Submit it again."
QUEUE_FULL = "too_many_jobs"
"""The refusal's code when an account already has ``[jobs] max_per_user`` jobs queued or running."""
KEEPS_GRAPH = ("queued", "running", "done")
"""The states of a job whose graph is kept: the runner reads it to train, the airlock lists a done one's."""
_GRAPH_FILE = re.compile(r"^([0-9a-f]{64})\.json$")
_PENDING_SECONDS = 600.0
"""How long a graph kept for a submission is held back from removal if the submission never reaches
:meth:`JobStore.submit` (it does at once; this bounds what a caller that stopped between them holds)."""
log = logging.getLogger("paitient.services.jobs")
_graphs_lock = threading.Lock()
_pending: dict[Path, list[float]] = {}
"""Graphs kept (:meth:`JobStore.keep_graph`) whose submission is not yet in the queue, by path, in this
process; a sweep neither runs beside a keep nor removes one of these (both under ``_graphs_lock``)."""

MIGRATIONS = Path(__file__).parent / "migrations"
COLUMNS = (
    "id",
    "username",
    "project",
    "dataset",
    "state",
    "spec",
    "graph_sha256",
    "created",
    "started",
    "finished",
    "cancel",
    "progress",
    "reason",
    "reservation",
)
TABLES = {"jobs": COLUMNS}
"""The table and its columns as the first migration makes it (and the store made it before migrations)."""
_SELECT = "SELECT " + ", ".join(COLUMNS) + " FROM jobs"  # noqa: S608 -- fixed column names


class JobError(ValueError):
    """A request about a job that cannot be met; ``code`` says which kind (for the socket's answer)."""

    def __init__(self, message: str, code: str = "bad_request"):
        super().__init__(message)
        self.code = code


class QueueFull(JobError, ChannelError):
    """The account already has its most jobs queued or running: the submission is refused, not queued. A
    :class:`ChannelError` as well, so the socket answers with this message and ``too_many_jobs``."""

    def __init__(self, message: str):
        JobError.__init__(self, message, QUEUE_FULL)


@dataclass(frozen=True)
class Job:
    id: str
    username: str
    project: str
    dataset: str
    state: str
    spec: dict[str, Any]
    graph_sha256: str
    created: float
    started: float | None
    finished: float | None
    cancel: bool
    progress: dict[str, Any]
    reason: str
    reservation: str

    def public(self) -> dict[str, Any]:
        """What the job's owner sees of it."""
        return {
            "id": self.id,
            "project": self.project,
            "dataset": self.dataset,
            "state": self.state,
            "spec": self.spec,
            "graph_sha256": self.graph_sha256,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "progress": self.progress,
            "reason": self.reason,
        }


class JobStore:
    """Safe to use from several threads (the socket's threads and the workers): a connection per operation,
    writers serialised by the database (:mod:`paitient.services.kit.db`)."""

    def __init__(self, state_dir: str | Path, database: Location | None = None, *, max_per_user: int | None = None):
        """Graphs and released files under ``<state_dir>/jobs``; the queue in ``database`` (default: SQLite at
        ``<state_dir>/jobs/jobs.sqlite3``); at most ``max_per_user`` jobs queued or running per account
        (default: ``[jobs] max_per_user``'s)."""
        if max_per_user is None:
            max_per_user = int(JobsSettings.max_per_user.default_value)
        if isinstance(max_per_user, bool) or not isinstance(max_per_user, int) or max_per_user < 1:
            raise ValueError(f"max_per_user must be a positive whole number, not {max_per_user!r}")
        self.max_per_user = max_per_user
        self.state_dir = Path(state_dir)
        self.root = self.state_dir / "jobs"
        private_dirs(self.state_dir, self.root / "graphs")
        private_dirs(self.state_dir, self.root / "out")
        self.db = Database(
            database or Location(self.root / "jobs.sqlite3"), what="jobs queue", migrations=MIGRATIONS, tables=TABLES
        )

    @classmethod
    def for_site(cls, site: Any) -> JobStore:
        """The site's queue: in ``[database] url``'s schema ``jobs``, or the SQLite file under its state_dir."""
        state_dir = Path(site.state_dir)
        return cls(
            state_dir,
            Location.for_site(site, "jobs", state_dir / "jobs" / "jobs.sqlite3"),
            max_per_user=int(site.jobs.max_per_user),
        )

    def close(self) -> None:
        self.db.close()

    def _read(self) -> AbstractContextManager[sa.Connection]:
        return self.db.transaction(write=False)

    def _tx(self) -> AbstractContextManager[sa.Connection]:
        return self.db.transaction(write=True)

    # -- the graph and the released files ----------------------------------------------------------------

    def graph_path(self, sha256: str) -> Path:
        return self.root / "graphs" / f"{sha256}.json"

    def keep_graph(self, sha256: str, program: bytes) -> None:
        """Keep the graph of a submission about to be made (:meth:`submit`): held back from removal until the
        submission is in the queue (or refused)."""
        path = self.graph_path(sha256)
        with _graphs_lock:
            _pending.setdefault(path, []).append(time.monotonic())
            create_once(path, program)

    def _submitted(self, sha256: str) -> None:
        """The submission of a kept graph is in the queue or was refused: its hold ends."""
        path = self.graph_path(sha256)
        with _graphs_lock:
            held = _pending.get(path)
            if held:
                held.pop(0)
            if not held:
                _pending.pop(path, None)

    def sweep_graphs(self, candidates: Iterable[str] | None = None) -> list[str]:
        """Remove the graphs among ``candidates`` (SHA-256s; None: every graph kept) that no queued, running
        or done job names and no submission in progress holds; returns their SHA-256s."""
        folder = self.root / "graphs"
        if candidates is None:
            shas = {m.group(1) for p in folder.iterdir() if (m := _GRAPH_FILE.match(p.name))}
        else:
            shas = {c for c in candidates if _GRAPH_FILE.match(f"{c}.json")}
        if not shas:
            return []
        removed = []
        with _graphs_lock:  # no keep meanwhile; a submission not held here has committed its row already
            now = time.monotonic()
            held = {path for path, times in _pending.items() if any(now - t < _PENDING_SECONDS for t in times)}
            with self._read() as db:
                named = set(
                    db.execute(
                        sa.text("SELECT DISTINCT graph_sha256 FROM jobs WHERE state IN ('queued', 'running', 'done')")
                    ).scalars()
                )
            for sha in sorted(shas - named):
                path = self.graph_path(sha)
                if path in held:
                    continue
                with suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(sha)
        return removed

    def out_dir(self, job_id: str) -> Path:
        return self.root / "out" / job_id

    def released(self, job_id: str) -> tuple[bytes, dict[str, Any]]:
        """A finished job's weights and signed record, as the runner published them."""
        out = self.out_dir(job_id)
        return (out / "model.safetensors").read_bytes(), json.loads((out / "record.json").read_text())

    # -- states ------------------------------------------------------------------------------------------

    def submit(self, *, username: str, project: str, dataset: str, spec: dict[str, Any], graph_sha256: str) -> Job:
        """Queue a job, unless ``username`` has ``max_per_user`` queued or running (:class:`QueueFull`)."""
        job_id = f"job-{secrets.token_hex(6)}"
        try:
            self._insert(job_id, username, project, dataset, spec, graph_sha256)
        except QueueFull:
            self._submitted(graph_sha256)
            self._sweep_quietly([graph_sha256])  # kept for a job that will not be
            raise
        except BaseException:
            self._submitted(graph_sha256)
            raise
        self._submitted(graph_sha256)
        return self.get(job_id)

    def check_room(self, username: str) -> None:
        """:class:`QueueFull` if ``username`` has ``max_per_user`` jobs queued or running now; what a submission
        asks before the work of checking its graph (the cap holds in :meth:`submit`'s transaction)."""
        with self._read() as db:
            self._room(db, username)

    def _room(self, db: sa.Connection, username: str) -> None:
        rows = db.execute(
            sa.text(
                "SELECT state, COUNT(*) FROM jobs WHERE username = :username "
                "AND state IN ('queued', 'running') GROUP BY state"
            ),
            {"username": username},
        ).all()
        held = {state: int(n) for state, n in rows}
        queued, running = held.get("queued", 0), held.get("running", 0)
        if queued + running >= self.max_per_user:
            raise QueueFull(
                f"the job was not submitted: you have {queued} job(s) queued and {running} running, and an "
                f"account may have {self.max_per_user} at once ([jobs] max_per_user). Wait for one to end, or "
                "cancel one you no longer need with jobs.cancel(job) (jobs.list() shows yours), then "
                "submit again."
            )

    def _insert(
        self, job_id: str, username: str, project: str, dataset: str, spec: dict[str, Any], graph_sha256: str
    ) -> None:
        with self._tx() as db:  # the count and the row in one write transaction: racing submissions queue
            self._room(db, username)
            db.execute(
                sa.text(
                    "INSERT INTO jobs (id, username, project, dataset, state, spec, graph_sha256, created) "
                    "VALUES (:id, :username, :project, :dataset, 'queued', :spec, :graph, :now)"
                ),
                {
                    "id": job_id,
                    "username": username,
                    "project": project,
                    "dataset": dataset,
                    "spec": json.dumps(spec, sort_keys=True),
                    "graph": graph_sha256,
                    "now": time.time(),
                },
            )

    def get(self, job_id: str) -> Job:
        with self._read() as db:
            row = db.execute(sa.text(f"{_SELECT} WHERE id = :id"), {"id": job_id}).first()
        if row is None:
            raise JobError(f"there is no job {job_id!r}", "unknown_job")
        return _job(row)

    def of_user(self, username: str, limit: int = 100) -> list[Job]:
        with self._read() as db:
            rows = db.execute(
                sa.text(f"{_SELECT} WHERE username = :username ORDER BY created DESC LIMIT :limit"),
                {"username": username, "limit": limit},
            ).all()
        return [_job(r) for r in rows]

    def counts(self) -> dict[tuple[str, str], int]:
        """How many jobs each project has in each state."""
        with self._read() as db:
            rows = db.execute(sa.text("SELECT project, state, COUNT(*) FROM jobs GROUP BY project, state")).all()
        return {(project, state): int(n) for project, state, n in rows}

    def oldest_queued(self) -> float | None:
        """When the job waiting longest for a worker was submitted, or None when none waits."""
        with self._read() as db:
            created = db.execute(sa.text("SELECT MIN(created) FROM jobs WHERE state = 'queued'")).scalar()
        return None if created is None else float(created)

    def claim(self) -> Job | None:
        """A queued job, now ``running``; None when nothing waits. The job is the oldest of the account with
        the fewest jobs running, and among those of the account whose latest job started longest ago (one
        never served first): with one worker, each account waiting gets a job in turn."""
        with self._tx() as db:
            job_id = db.execute(
                sa.text(
                    "SELECT q.id FROM jobs AS q LEFT JOIN ("
                    "SELECT username, SUM(CASE WHEN state = 'running' THEN 1 ELSE 0 END) AS running, "
                    "MAX(started) AS served FROM jobs WHERE started IS NOT NULL GROUP BY username"
                    ") AS a ON a.username = q.username WHERE q.state = 'queued' "
                    "ORDER BY COALESCE(a.running, 0), COALESCE(a.served, 0), q.created, q.id LIMIT 1"
                )
            ).scalar()
            if job_id is None:
                return None
            db.execute(
                sa.text("UPDATE jobs SET state = 'running', started = :now, reason = '' WHERE id = :id"),
                {"now": time.time(), "id": job_id},
            )
        return self.get(job_id)

    def requeue(self, job_id: str, reason: str) -> Job:
        """Put a claimed job back in the queue, untouched (nothing reserved, nothing read), with ``reason``
        for its owner to see while it waits; a cancel that came in meanwhile ends it ``cancelled``."""
        with self._tx() as db:
            db.execute(
                sa.text(
                    "UPDATE jobs SET state = CASE WHEN cancel <> 0 THEN 'cancelled' ELSE 'queued' END, "
                    "reason = CASE WHEN cancel <> 0 THEN 'cancelled before it started' ELSE :reason END, "
                    "started = NULL, finished = CASE WHEN cancel <> 0 THEN :now ELSE NULL END "
                    "WHERE id = :id AND state = 'running'"
                ),
                {"reason": reason, "now": time.time(), "id": job_id},
            )
        return self._ended(self.get(job_id))

    def progress(self, job_id: str, progress: dict[str, Any]) -> bool:
        """Record a running job's progress; returns whether it should go on (False: cancelled)."""
        with self._tx() as db:
            db.execute(
                sa.text("UPDATE jobs SET progress = :progress WHERE id = :id"),
                {"progress": json.dumps(progress), "id": job_id},
            )
            cancel = db.execute(sa.text("SELECT cancel FROM jobs WHERE id = :id"), {"id": job_id}).scalar_one()
        return not cancel

    def set_reservation(self, job_id: str, reservation: str) -> None:
        with self._tx() as db:
            db.execute(
                sa.text("UPDATE jobs SET reservation = :reservation WHERE id = :id"),
                {"reservation": reservation, "id": job_id},
            )

    def finish(self, job_id: str, state: str, reason: str = "") -> Job:
        if state not in FINAL:
            raise ValueError(f"a job ends as one of {', '.join(FINAL)}, not {state!r}")
        with self._tx() as db:
            db.execute(
                sa.text(
                    "UPDATE jobs SET state = :state, reason = :reason, finished = :now "
                    "WHERE id = :id AND state IN ('queued', 'running')"
                ),
                {"state": state, "reason": reason, "now": time.time(), "id": job_id},
            )
        return self._ended(self.get(job_id))

    def cancel(self, job_id: str, username: str) -> Job:
        """Cancel a queued job at once, a running one at its next step."""
        job = self.get(job_id)
        if job.username != username:
            raise JobError(f"job {job_id} is another user's", "forbidden")
        with self._tx() as db:
            db.execute(sa.text("UPDATE jobs SET cancel = 1 WHERE id = :id"), {"id": job_id})
            db.execute(
                sa.text(
                    "UPDATE jobs SET state = 'cancelled', reason = 'cancelled before it started', finished = :now "
                    "WHERE id = :id AND state = 'queued'"
                ),
                {"now": time.time(), "id": job_id},
            )
        return self._ended(self.get(job_id))

    def _ended(self, job: Job) -> Job:
        """After a change of ``job``'s state: its graph goes if it failed or was cancelled and no other job
        keeps it."""
        if job.state not in KEEPS_GRAPH:
            self._sweep_quietly([job.graph_sha256])
        return job

    def _sweep_quietly(self, shas: list[str]) -> None:
        """:meth:`sweep_graphs`, after the change it follows is made: a failure is logged, not raised (what it
        left is removed at the next start)."""
        try:
            self.sweep_graphs(shas)
        except (OSError, sa.exc.SQLAlchemyError) as e:
            log.warning("jobs: graphs %s not removed now: %s", ", ".join(shas), e)

    def recover(self) -> list[Job]:
        """At start: jobs left ``running`` by a runner that stopped are ``failed``, with the reason."""
        with self._tx() as db:
            ids = list(db.execute(sa.text("SELECT id FROM jobs WHERE state = 'running'")).scalars())
            if ids:
                now = time.time()
                db.execute(
                    sa.text("UPDATE jobs SET state = 'failed', reason = :reason, finished = :now WHERE id = :id"),
                    [{"reason": STOPPED_MID_JOB, "now": now, "id": i} for i in ids],
                )
        self.sweep_graphs()  # what no job keeps: of failed and cancelled jobs, of refused submissions
        return [self.get(i) for i in ids]


def _job(row: sa.Row[Any]) -> Job:
    r = row._mapping
    return Job(
        id=r["id"],
        username=r["username"],
        project=r["project"],
        dataset=r["dataset"],
        state=r["state"],
        spec=json.loads(r["spec"]),
        graph_sha256=r["graph_sha256"],
        created=float(r["created"]),
        started=None if r["started"] is None else float(r["started"]),
        finished=None if r["finished"] is None else float(r["finished"]),
        cancel=bool(r["cancel"]),
        progress=json.loads(r["progress"]),
        reason=r["reason"],
        reservation=r["reservation"],
    )
