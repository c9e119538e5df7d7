"""The training-jobs runner: kernels submit a model graph and a request; the runner trains it under DP.

Run by ``paitient service jobs`` (a hub-managed service). Kernels reach ``<run_dir>/jobs.sock``; the
caller is whoever the socket's peer credentials say (uid -> registry member -> projects). Operations:

- ``submit``: the request (:func:`paitient.rules.jobspec.check_request`) and, as a file descriptor, the
  model's exported graph; the graph is checked (:mod:`.graph`) before anything is queued;
- ``status`` and ``list``: the caller's own jobs; ``cancel``: one of them (a queued job at once, a
  running one at its next step); ``record``: the signed record of one that is done;
- ``checkpoints``: the pretrained checkpoints of the operator's registry (:mod:`.checkpoints`), names,
  descriptions, sources and parameter shapes, never values; a request may name one to start from, and
  submit refuses one whose parameters are not exactly the graph's;
- ``release`` (root, the airlock): a finished job's record and weights, for the job's owner's request.

Each job runs on one of ``[jobs] concurrency`` worker threads (:class:`Runner`): the runner reads the dataset
version, splits off its held-out rows, plans the noise for the target epsilon, reserves that budget with
the ledger for the researcher (``reserve_job``), trains in a sandbox as the runner's own account
(:mod:`.execute`), checks the weights it gets back against the graph, signs the record
(:mod:`paitient.rules.training_record`) and settles what its accountant spent (``settle_job``). A job that
fails or is cancelled after its reservation settles it in full: what was spent is not known to the runner.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from paitient.catalogue import DatasetNotFound, find, scan
from paitient.channel import BAD_REQUEST, FORBIDDEN, TOO_LARGE, UNAVAILABLE, ChannelError, Peer
from paitient.registry import Member, Registry
from paitient.rules.jobspec import SpecError, check_request, check_steps
from paitient.services.audit import emit
from paitient.services.jobs.store import Job, JobError, JobStore
from paitient.services.kit.access import channel_options
from paitient.services.kit.channel import ChannelServer
from paitient.services.kit.process import StopSignal, socket_path

MAX_GRAPH_BYTES = 2_000_000
CHECKING = "busy"
"""The refusal's code when one of the caller's graphs is still being checked."""
log = logging.getLogger("paitient.services.jobs")


class JobsService:
    """The socket's operations, given a store, a registry and a way to check a graph."""

    def __init__(self, site: Any, store: JobStore, registry: Registry, *, wake: threading.Event | None = None):
        self.site, self.store, self.registry = site, store, registry
        self.wake = wake or threading.Event()
        self._checking: set[str] = set()
        """Accounts one of whose graphs is being checked: one at a time each (:meth:`_one_check`)."""
        self._checking_lock = threading.Lock()

    def handlers(self) -> dict[str, Any]:
        return {
            "submit": self.submit,
            "status": self.status,
            "list": self.list_jobs,
            "cancel": self.cancel,
            "record": self.record,
            "release": self.release,
            "checkpoints": self.checkpoints,
        }

    def member(self, peer: Peer) -> Member:
        member = self.registry.by_uid(peer.uid)
        if member is None:
            raise ChannelError(f"uid {peer.uid} is not a paitient user; jobs are submitted from a kernel", FORBIDDEN)
        return member

    def submit(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        member = self.member(peer)
        try:
            spec = check_request(args)
        except SpecError as e:
            raise ChannelError(str(e), BAD_REQUEST) from None
        if len(fds) != 1:
            raise ChannelError("send the model's exported graph as one file descriptor with the request", BAD_REQUEST)
        program = _read_fd(fds[0], MAX_GRAPH_BYTES)
        info = self._dataset(member, spec)
        _within_planning(spec, info)
        # Checking a graph holds the process's one graph-building lock (seconds for the largest): an account at
        # its cap is refused before, and one account's graphs are checked one at a time, so that no account
        # keeps the others' submissions (and the workers' checks) waiting behind a stream of its own.
        self.store.check_room(member.username)
        from paitient.services.jobs.graph import GraphRefused, load_graph

        with self._one_check(member.username):
            try:
                graph = load_graph(program, max_bytes=MAX_GRAPH_BYTES)
            except GraphRefused as e:
                raise ChannelError(f"the model cannot be trained by the runner: {e}", "graph_refused") from None
        if not graph.input_dtype.is_floating_point:
            raise ChannelError(
                f"the model cannot be trained by the runner: it takes {graph.input_dtype} rows, and the runner "
                "gives it the features as float32 (whole numbers an embedding could index would be read from "
                "fractions): one-hot the categories in preprocessing and start with a Linear layer",
                "graph_refused",
            )
        if spec["checkpoint"] is not None:
            spec["checkpoint_sha256"] = self._checkpoint_for(spec["checkpoint"], graph)
        self.store.keep_graph(graph.sha256, program)
        spec["project"] = info.project
        job = self.store.submit(
            username=member.username, project=info.project, dataset=info.name, spec=spec, graph_sha256=graph.sha256
        )
        # No record, no job: a submission the trail cannot hold is cancelled before the runner can take it.
        if not self._audit(
            member.username, "jobs.submit", job, {"graph_sha256": graph.sha256, "ops": sorted(graph.ops)}
        ):
            self.store.cancel(job.id, job.username)
            raise ChannelError(
                "the job was not submitted: the audit trail cannot record it right now; try again in a moment, and "
                "tell the workspace operator if it keeps happening",
                UNAVAILABLE,
            )
        self.wake.set()
        return job.public()

    @contextmanager
    def _one_check(self, username: str) -> Iterator[None]:
        with self._checking_lock:
            if username in self._checking:
                raise ChannelError(
                    "the job was not submitted: another model of yours is being checked right now; submit one at a "
                    "time (wait for jobs.submit to return, then submit the next)",
                    CHECKING,
                )
            self._checking.add(username)
        try:
            yield
        finally:
            with self._checking_lock:
                self._checking.discard(username)

    def _checkpoint_for(self, name: str, graph: Any) -> str:
        """The SHA-256 of checkpoint ``name`` if its parameters are exactly the graph's (the job is pinned to
        that file: one put in its place later is refused when the job starts)."""
        from paitient.services.jobs.checkpoints import CheckpointRefused, CheckpointRegistry, match

        try:
            entry = CheckpointRegistry(self.site.state_dir).get(name)
            match(entry.parameters, graph.params)
        except CheckpointRefused as e:
            raise ChannelError(str(e), "checkpoint_refused") from None
        return entry.sha256

    def checkpoints(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> list[dict[str, Any]]:
        """The registry's checkpoints, for any member: what each is, where from, its parameters' shapes."""
        self.member(peer)
        from paitient.services.jobs.checkpoints import CheckpointRefused, CheckpointRegistry

        try:
            return [c.public() for c in CheckpointRegistry(self.site.state_dir).list()]
        except CheckpointRefused as e:
            raise ChannelError(str(e), "checkpoint_refused") from None

    def _dataset(self, member: Member, spec: dict[str, Any]) -> Any:
        projects = [p for p in member.projects if spec["project"] in (None, p)]
        if not projects:
            raise ChannelError(f"you are not a member of project {spec['project']!r}", FORBIDDEN)
        infos = [i for i in scan(self.site.data_root) if i.project in projects]
        try:
            return find(infos, spec["dataset"], spec["project"])
        except DatasetNotFound as e:
            raise ChannelError(str(e), "unknown_dataset") from None

    def _own(self, peer: Peer, args: dict[str, Any]) -> Job:
        member = self.member(peer)
        job_id = args.get("job_id")
        if not isinstance(job_id, str):
            raise ChannelError("job_id must be the id submit returned", BAD_REQUEST)
        try:
            job = self.store.get(job_id)
        except JobError as e:
            raise ChannelError(str(e), e.code) from None
        if job.username != member.username:
            raise ChannelError(f"job {job_id} is another user's", FORBIDDEN)
        return job

    def status(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return self._own(peer, args).public()

    def list_jobs(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> list[dict[str, Any]]:
        return [j.public() for j in self.store.of_user(self.member(peer).username)]

    def cancel(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        job = self._own(peer, args)
        job = self.store.cancel(job.id, job.username)
        self._audit(job.username, "jobs.cancel", job, {"state": job.state})
        return job.public()

    def record(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """The signed record of one of the caller's finished jobs."""
        job = self._own(peer, args)
        if job.state != "done":
            raise ChannelError(f"job {job.id} is {job.state}: only a finished job has a record", "not_done")
        return self.store.released(job.id)[1]

    def release(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """For the airlock (root): a finished job's signed record and weights (base64), if ``user`` owns it,
        and the listing of the graph it trained (one line per node, every number shown), for the steward."""
        if not peer.is_root:
            raise ChannelError("only the airlock takes a job's weights out of the runner", FORBIDDEN)
        job_id, user = args.get("job_id"), args.get("user")
        try:
            job = self.store.get(str(job_id))
        except JobError as e:
            raise ChannelError(str(e), e.code) from None
        if job.username != user:
            raise ChannelError(f"job {job.id} is not {user!r}'s", FORBIDDEN)
        if job.state != "done":
            raise ChannelError(
                f"job {job.id} is {job.state}: only a finished job's weights can be requested", "not_done"
            )
        import base64

        from paitient.services.jobs.graph import described

        weights, envelope = self.store.released(job.id)
        lines, numbers = described(self.store.graph_path(job.graph_sha256).read_bytes(), max_bytes=MAX_GRAPH_BYTES)
        return {
            "record": envelope,
            "weights": base64.b64encode(weights).decode(),
            "graph": {"lines": list(lines), "numbers": list(numbers)},
        }

    def _audit(self, actor: str, action: str, job: Job, details: dict[str, Any], outcome: str = "ok") -> bool:
        """Write the record; False (and logged) when the trail cannot take it."""

        try:
            emit(
                self.site,
                actor=actor,
                action=action,
                object=job.id,
                outcome=outcome,
                details={"project": job.project, "dataset": job.dataset, **details},
            )
        except Exception as e:
            log.error("jobs: audit record %s for %s not written: %s", action, job.id, e)
            return False
        return True


def _within_planning(spec: dict[str, Any], info: Any) -> None:
    """Refuse, before anything is queued or reserved, a request whose steps on the dataset's training rows (the
    catalogue's row count less the held-out share, as the runner splits it) are more than the runner plans
    (:func:`paitient.rules.jobspec.check_steps`); a dataset whose manifest has no row count is checked by the
    runner on the rows it reads, before it reserves anything."""
    rows = info.rows
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 3:
        return
    n_train = rows - max(1, round(rows * spec["holdout"]))
    try:
        check_steps(spec, n_train)
    except SpecError as e:
        raise ChannelError(str(e), BAD_REQUEST) from None


NOT_A_FILE = (
    "send the model's exported graph as a regular file opened for reading (paitient.jobs.submit sends one); "
    "not a pipe, socket, directory, device or a path-only descriptor"
)


def _read_fd(fd: int, limit: int) -> bytes:
    """The graph the caller sent as ``fd``: a regular file only, read from its start to at most its size when
    sent (and at most ``limit`` bytes). Anything else is refused at once: a pipe or socket whose other end the
    caller holds open would keep the connection's thread waiting for ever, and a few such calls would use up
    the caller's connections for every jobs operation."""
    try:
        info = os.fstat(fd)
        regular = stat.S_ISREG(info.st_mode) and os.pread(fd, 0, 0) == b""
    except OSError:
        regular = False
    if not regular:
        raise ChannelError(NOT_A_FILE, BAD_REQUEST)
    if info.st_size > limit:
        raise ChannelError(f"the model's graph has {info.st_size} bytes, more than {limit}", TOO_LARGE)
    chunks, size = [], 0
    while size < info.st_size:  # a file that grows meanwhile is read as it was: to the size it had
        try:
            chunk = os.pread(fd, min(1 << 16, info.st_size - size), size)
        except OSError:
            raise ChannelError(NOT_A_FILE, BAD_REQUEST) from None
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def custom_scopes() -> dict[str, dict[str, str]]:
    """The runner has no page for people and defines no hub scope: kernels reach it over its socket only."""
    return {}


def hub_service(site: Any, python: str, *, port: int = 0) -> dict[str, Any]:
    """The JupyterHub managed-service entry that runs the training runner: its socket, and on loopback its
    metrics for the operator's token (:mod:`.web`); no page for people, so not listed on the hub's home."""
    from paitient.services.kit.process import managed_service

    entry = managed_service(site, "jobs", python, port=port, scopes=[], description="Certified training jobs")
    return {**entry, "display": False}


def serve(site: Any, log_: logging.Logger) -> None:
    """Serve ``<run_dir>/jobs.sock`` and run queued jobs until SIGTERM/SIGINT."""
    from paitient.services.jobs.runner import Runner

    store = JobStore.for_site(site)  # [database] url's schema jobs, or <state_dir>/jobs/jobs.sqlite3
    for job in store.recover():
        log_.warning("jobs: %s was running when the runner stopped; marked failed", job.id)
    registry = Registry.for_state_dir(site.state_dir)
    wake = threading.Event()
    service = JobsService(site, store, registry, wake=wake)
    path = Path(socket_path(site, "jobs"))
    server = ChannelServer(path, service.handlers(), name="jobs", **channel_options(site, "jobs", partial(emit, site)))
    runner = Runner(site, store, registry, wake=wake, log=log_)
    stop = StopSignal()
    server.start_in_thread()
    runner.start()
    log_.info("jobs: listening on %s, %d worker(s)", path, runner.concurrency)
    page = None
    url = os.environ.get("JUPYTERHUB_SERVICE_URL", "")
    try:
        if url:
            from paitient.services.jobs.web import run_in_thread

            page = run_in_thread(site, store, url, log_)
        while not stop.wait(1.0):
            pass
    finally:
        if page is not None:
            page.stop()
        runner.stop()
        server.shutdown()
        server.server_close()
        store.close()
        log_.info("jobs: stopped")
