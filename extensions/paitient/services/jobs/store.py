"""The runner's queue: training jobs and their states, in SQLite, surviving a restart and a crash mid-write.

``<state_dir>/jobs/jobs.sqlite3`` (root 0600 in a 0700 folder), WAL. A job is ``queued`` when submitted,
``running`` while a worker has it, then ``done``, ``failed`` (with the reason) or ``cancelled``. Each change
is one transaction. A job that was ``running`` when the runner stopped (a crash, ``kill -9``) is marked
``failed`` at the next start, with that reason: its reservation belonged to the runner process that died,
so the ledger counts it in full. The model graph is kept beside the queue by its SHA-256
(``graphs/<sha256>.json``, made once), the released files of a finished job in ``out/<job id>/``.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paitient.fsutil import create_once
from paitient.services.kit.secretfile import private_dirs
from paitient.services.kit.sqlite import write_transaction

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL = ("done", "failed", "cancelled")
STOPPED_MID_JOB = "the runner stopped while the job ran; its reservation counts in full. Submit it again."

SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
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
    """Thread-safe: one connection and one lock (the socket's threads and the workers share it)."""

    def __init__(self, state_dir: str | Path):
        self.state_dir = Path(state_dir)
        self.root = self.state_dir / "jobs"
        private_dirs(self.state_dir, self.root / "graphs")
        private_dirs(self.state_dir, self.root / "out")
        self._lock = threading.Lock()
        path = self.root / "jobs.sqlite3"
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        path.chmod(0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return write_transaction(self._db, self._lock)

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
                "INSERT INTO jobs (id, username, project, dataset, state, spec, graph_sha256, created) "
                "VALUES (?, ?, ?, ?, 'queued', ?, ?, ?)",
                (job_id, username, project, dataset, json.dumps(spec, sort_keys=True), graph_sha256, time.time()),
            )
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobError(f"there is no job {job_id!r}", "unknown_job")
        return _job(row)

    def of_user(self, username: str, limit: int = 100) -> list[Job]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE username = ? ORDER BY created DESC LIMIT ?", (username, limit)
            ).fetchall()
        return [_job(r) for r in rows]

    def counts(self) -> dict[tuple[str, str], int]:
        """How many jobs each project has in each state."""
        with self._lock:
            rows = self._db.execute("SELECT project, state, COUNT(*) FROM jobs GROUP BY project, state").fetchall()
        return {(project, state): int(n) for project, state, n in rows}

    def oldest_queued(self) -> float | None:
        """When the job waiting longest for a worker was submitted, or None when none waits."""
        with self._lock:
            (created,) = self._db.execute("SELECT MIN(created) FROM jobs WHERE state = 'queued'").fetchone()
        return None if created is None else float(created)

    def claim(self) -> Job | None:
        """The oldest queued job, now ``running``; None when nothing waits."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY created LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', started = ? WHERE id = ?", (time.time(), row[0]))
        return self.get(row[0])

    def progress(self, job_id: str, progress: dict[str, Any]) -> bool:
        """Record a running job's progress; returns whether it should go on (False: cancelled)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET progress = ? WHERE id = ?", (json.dumps(progress), job_id))
            (cancel,) = db.execute("SELECT cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return not cancel

    def set_reservation(self, job_id: str, reservation: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET reservation = ? WHERE id = ?", (reservation, job_id))

    def finish(self, job_id: str, state: str, reason: str = "") -> Job:
        if state not in FINAL:
            raise ValueError(f"a job ends as one of {', '.join(FINAL)}, not {state!r}")
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = ?, reason = ?, finished = ? WHERE id = ? AND state IN ('queued', 'running')",
                (state, reason, time.time(), job_id),
            )
        return self.get(job_id)

    def cancel(self, job_id: str, username: str) -> Job:
        """Cancel a queued job at once, a running one at its next step."""
        job = self.get(job_id)
        if job.username != username:
            raise JobError(f"job {job_id} is another user's", "forbidden")
        with self._tx() as db:
            db.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (job_id,))
            db.execute(
                "UPDATE jobs SET state = 'cancelled', reason = 'cancelled before it started', finished = ? "
                "WHERE id = ? AND state = 'queued'",
                (time.time(), job_id),
            )
        return self.get(job_id)

    def recover(self) -> list[Job]:
        """At start: jobs left ``running`` by a runner that stopped are ``failed``, with the reason."""
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state = 'running'").fetchall()]
            db.executemany(
                "UPDATE jobs SET state = 'failed', reason = ?, finished = ? WHERE id = ?",
                [(STOPPED_MID_JOB, time.time(), i) for i in ids],
            )
        return [self.get(i) for i in ids]


def _job(row: tuple[Any, ...]) -> Job:
    (jid, user, project, dataset, state, spec, graph, created, started, finished, cancel, progress, reason, res) = row
    return Job(
        id=jid,
        username=user,
        project=project,
        dataset=dataset,
        state=state,
        spec=json.loads(spec),
        graph_sha256=graph,
        created=created,
        started=started,
        finished=finished,
        cancel=bool(cancel),
        progress=json.loads(progress),
        reason=reason,
        reservation=res,
    )
