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
"""

from __future__ import annotations

import json
import secrets
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from paitient.fsutil import create_once
from paitient.services.kit.db import Database, Location
from paitient.services.kit.secretfile import private_dirs

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL = ("done", "failed", "cancelled")
STOPPED_MID_JOB = "the runner stopped while the job ran; its reservation counts in full. Submit it again."

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

    def __init__(self, state_dir: str | Path, database: Location | None = None):
        """Graphs and released files under ``<state_dir>/jobs``; the queue in ``database`` (default: SQLite at
        ``<state_dir>/jobs/jobs.sqlite3``)."""
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
        return cls(state_dir, Location.for_site(site, "jobs", state_dir / "jobs" / "jobs.sqlite3"))

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
        create_once(self.graph_path(sha256), program)

    def out_dir(self, job_id: str) -> Path:
        return self.root / "out" / job_id

    def released(self, job_id: str) -> tuple[bytes, dict[str, Any]]:
        """A finished job's weights and signed record, as the runner published them."""
        out = self.out_dir(job_id)
        return (out / "model.safetensors").read_bytes(), json.loads((out / "record.json").read_text())

    # -- states ------------------------------------------------------------------------------------------

    def submit(self, *, username: str, project: str, dataset: str, spec: dict[str, Any], graph_sha256: str) -> Job:
        job_id = f"job-{secrets.token_hex(6)}"
        with self._tx() as db:
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
        return self.get(job_id)

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
        """The oldest queued job, now ``running``; None when nothing waits."""
        with self._tx() as db:
            job_id = db.execute(sa.text("SELECT id FROM jobs WHERE state = 'queued' ORDER BY created LIMIT 1")).scalar()
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
        return self.get(job_id)

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
        return self.get(job_id)

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
        return self.get(job_id)

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
