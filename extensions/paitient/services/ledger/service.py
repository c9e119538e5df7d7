"""The privacy-ledger service: kernels reserve and settle privacy budget over a unix socket.

Run by ``paitient service ledger`` (a JupyterHub managed service, see :func:`hub_service`). It serves
``<run_dir>/ledger.sock`` with the operations ``reserve``, ``settle``, ``budget``, ``total``, ``records``
and ``record_by_hash``. The caller is whoever the socket's peer credentials say: uid -> registry member ->
that member's projects. A kernel may act only for its own user's projects; an unknown uid is refused.
Root (another root-side service, such as the airlock checking weights) may read every project and
change nothing: ``reserve`` and ``settle`` refuse it. The one exception is the training-jobs runner (root),
which reserves and settles a job's budget for the researcher who submitted it (``reserve_job``,
``settle_job``); a job's reservation is settled by the runner only, never from a kernel.

The reserving process id comes from ``SO_PEERCRED`` too (the host's pid, whatever pid namespace the
kernel runs in), with its start time from ``/proc``; when that process is gone before it settled, its
reservation is marked *lost* and counts in full. This check runs before every reservation and budget
query and every :data:`SWEEP_SECONDS`. A reservation made from a user's Kubernetes pod (through the
workspace's gateway) carries the kernel's pid and start time as the pod's relay sees them, and the pod: the
relay reports its pod's live processes through the gateway (``pod_report``, forwarded by the gateway
only), and such a reservation is lost once its pod's last report is older than ``pod_stale_seconds`` or
does not name its kernel (:class:`PodReports`).

A job's reservation whose runner the ledger cannot see (pid 0: the jobs service in another pid namespace,
its own container of the hub's pod on Kubernetes) is held by lease instead: the runner renews it
(``renew_job``) every :data:`RENEW_SECONDS` while the job runs, and it is lost once the last renewal is
older than ``pod_stale_seconds`` (:class:`Leases`). A runner killed mid-job renews nothing: its job's
reservation counts in full a minute later.

Nothing changes in the ledger unrecorded for long: each reservation, refusal and settlement is written to
the audit trail as it happens. A record the trail cannot take waits in the service, in order, and is
written before anything else once the trail takes records again; it is held in the ledger's database
meanwhile, so a restart of the service loses none of them. While any waits, no budget is reserved
(a reservation whose own record fails is released at once, spending nothing, and refused). A settlement
is committed whether or not its record can be written at that moment: it only closes what a run spent,
and refusing it would count the run in full later anyway.
With ``JUPYTERHUB_SERVICE_URL`` set (the hub sets it), the stewards' web page is served there as well.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Literal, overload

from paitient.channel import BAD_REQUEST, FORBIDDEN, ChannelError, Peer
from paitient.config import NAME_RE
from paitient.registry import Member, Registry
from paitient.rules.budget import BudgetExceeded
from paitient.rules.records import Event
from paitient.services.audit import emit, trail_writer
from paitient.services.kit.access import channel_options
from paitient.services.kit.backlog import Backlog
from paitient.services.kit.channel import ChannelServer
from paitient.services.kit.process import StopSignal, managed_service, process_start, socket_path
from paitient.services.ledger.api import READ_SCOPE, custom_scopes, public_run, role_scopes
from paitient.services.ledger.store import JOB_RUN_PREFIX, Ledger, LedgerError

__all__ = ["READ_SCOPE", "LedgerService", "custom_scopes", "hub_service", "public_run", "role_scopes", "serve"]

SWEEP_SECONDS = 10.0
POD_STALE_SECONDS = 60.0
"""How long a pod's last report of its live processes holds (its relay reports every 10 s by default)."""
MAX_POD_PROCESSES = 4096
MAX_RUN_ID = 128
NOT_RECORDED = (
    "the budget was not reserved: the audit trail cannot record it; try again in a while, and tell the "
    "workspace's operator if it goes on"
)


def hub_service(site, python: str, *, port: int = 0) -> dict[str, Any]:
    """The JupyterHub managed-service entry (``c.JupyterHub.services``) that runs the ledger.

    The stewards' page listens on loopback; ``port=0`` picks a free port now.
    """
    return managed_service(
        site,
        "ledger",
        python,
        port=port,
        scopes=[READ_SCOPE],
        description="Privacy-budget ledger (stewards, read-only)",
    )


# -- process liveness ------------------------------------------------------------------------------


def alive(pid: int, start: int | None) -> bool:
    """Is the process that reserved still running (same pid *and* same start time, so no reused pid)?"""
    now = process_start(pid)
    return now is not None and (start is None or now == start)


class Leases:
    """The renewals of reservations whose reserving process the ledger cannot see (pid 0).

    Such a reservation is alive while its last renewal is at most ``stale`` seconds old. One not renewed yet
    (just made, or inherited by a restarted ledger) counts from the first time it is asked about, which a
    sweep does within :data:`SWEEP_SECONDS` of its making: a runner killed before it renewed at all still
    has its reservation counted in full."""

    def __init__(self, stale: float = POD_STALE_SECONDS, clock=time.monotonic):
        self.stale = stale
        self.clock = clock
        self._lock = threading.Lock()
        self._renewed: dict[str, float] = {}

    def renew(self, reservation: str) -> None:
        with self._lock:
            self._renewed[reservation] = self.clock()

    def alive(self, reservation: str) -> bool:
        now = self.clock()
        with self._lock:
            last = self._renewed.setdefault(reservation, now)
        return now - last <= self.stale

    def held(self) -> list[str]:
        """The reservations a lease is kept for."""
        with self._lock:
            return sorted(self._renewed)

    def forget(self, reservations: list[str]) -> None:
        with self._lock:
            for rid in reservations:
                self._renewed.pop(rid, None)


class PodReports:
    """The live processes each pod's relay last reported (through the gateway), and when.

    A reservation made from a pod is alive while its pod's last report is at most ``stale`` seconds old and
    names its (pid, start). Until a pod's first report after this service started, its reservations are given
    ``stale`` seconds (a restarted ledger has heard nothing yet); then they count in full."""

    def __init__(self, stale: float = POD_STALE_SECONDS, clock=time.monotonic):
        self.stale = stale
        self.clock = clock
        self.started = clock()
        self._lock = threading.Lock()
        self._reports: dict[str, tuple[float, frozenset[tuple[int, int | None]]]] = {}

    def report(self, pod: str, kernels: frozenset[tuple[int, int | None]]) -> None:
        with self._lock:
            self._reports[pod] = (self.clock(), kernels)

    def alive(self, pod: str, pid: int, start: int | None) -> bool:
        now = self.clock()
        with self._lock:
            last = self._reports.get(pod)
        if last is None:
            return now - self.started < self.stale
        when, kernels = last
        return now - when <= self.stale and (pid, start) in kernels


def _kernels(value: Any) -> frozenset[tuple[int, int | None]]:
    if not isinstance(value, list) or len(value) > MAX_POD_PROCESSES:
        raise ChannelError(f"kernels must be a list of at most {MAX_POD_PROCESSES} [pid, start] pairs", BAD_REQUEST)
    out = set()
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or type(item[0]) is not int
            or not (item[1] is None or type(item[1]) is int)
        ):
            raise ChannelError("each of kernels must be a [pid, start] pair of whole numbers", BAD_REQUEST)
        out.add((item[0], item[1]))
    return frozenset(out)


# -- request handling ------------------------------------------------------------------------------


@overload
def _str_arg(args: dict[str, Any], name: str, *, required: Literal[True] = True) -> str: ...
@overload
def _str_arg(args: dict[str, Any], name: str, *, required: bool) -> str | None: ...
def _str_arg(args: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = args.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ChannelError(f"{name} must be a project or dataset name, got {value!r}", BAD_REQUEST)
    return value


@overload
def _num_arg(args: dict[str, Any], name: str, *, required: Literal[True] = True) -> float: ...
@overload
def _num_arg(args: dict[str, Any], name: str, *, required: bool) -> float | None: ...
def _num_arg(args: dict[str, Any], name: str, *, required: bool = True) -> float | None:
    value = args.get(name)
    if value is None and not required:
        return None
    try:
        number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    except OverflowError:  # a JSON integer past a float's range
        number = math.inf
    if not math.isfinite(number):
        raise ChannelError(f"{name} must be a finite number, got {str(value)[:40]}", BAD_REQUEST)
    return number


def _only(args: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise ChannelError(
            f"unknown argument(s) {', '.join(unknown)}; send {', '.join(sorted(allowed))} "
            "(who you are comes from your connection)",
            BAD_REQUEST,
        )


class LedgerService:
    """The operations, given a ledger and a registry; :meth:`handlers` plugs them into a ChannelServer."""

    def __init__(
        self,
        site,
        ledger: Ledger,
        registry: Registry,
        log: logging.Logger,
        is_alive=alive,
        pod_stale_seconds: float = POD_STALE_SECONDS,
    ):
        self.site = site
        self.pods = PodReports(pod_stale_seconds)
        self.leases = Leases(pod_stale_seconds)
        self.ledger = ledger
        self.registry = registry
        self.log = log
        self.is_alive = is_alive
        self.backlog = Backlog(ledger.held, trail_writer(site), log, "ledger")
        """The records the trail has not taken yet (held in the ledger's database); no budget is reserved
        while any waits."""

    def handlers(self) -> dict[str, Any]:
        return {
            "reserve": self.reserve,
            "settle": self.settle,
            "reserve_job": self.reserve_job,
            "settle_job": self.settle_job,
            "renew_job": self.renew_job,
            "budget": self.budget,
            "total": self.total,
            "records": self.records,
            "record_by_hash": self.record_by_hash,
            "pod_report": self.pod_report,
        }

    # who may do what

    def member(self, peer: Peer) -> Member:
        """The workspace user behind a kernel. Root-side callers (root, not a workspace user) and unknown uids
        are refused: they charge no budget."""
        member = self.registry.by_uid(peer.uid)
        if member is None and peer.is_root:
            raise ChannelError(
                "root-side callers may read the ledger (budget, total, records, record_by_hash) but change "
                "nothing; budget is reserved and settled from the researcher's kernel",
                FORBIDDEN,
            )
        if member is None:
            raise ChannelError(
                f"uid {peer.uid} is not a paitient user; only workspace users' kernels may use the ledger",
                "unknown_user",
            )
        return member

    def readable_projects(self, peer: Peer) -> list[str]:
        known = [p.name for p in self.site.projects]
        if peer.is_root:
            return known
        return [p for p in self.member(peer).projects if p in known]

    def _project_for(self, peer: Peer, project: str) -> None:
        if project not in self.readable_projects(peer):
            if peer.is_root:
                raise ChannelError(f"there is no project {project!r} in the site configuration", "unknown_project")
            raise ChannelError(
                f"you are not a member of project {project!r}; a kernel can use only its user's projects",
                FORBIDDEN,
            )

    def sweep(self) -> list[str]:
        gone = self.ledger.mark_lost(self.is_alive, self.pods.alive, self.leases.alive)
        self.leases.forget(gone)
        for rid in gone:
            run = self.ledger.run(rid) or {}
            self.log.warning("ledger: run %s ended without settling; counted in full", rid)
            self.audit(
                run.get("username", "system"),
                "ledger.settle",
                f"{run.get('project')}/{run.get('dataset')}",
                "ok",
                {
                    "reservation": rid,
                    "state": "lost",
                    "epsilon_spent": run.get("epsilon"),
                    "project": run.get("project"),
                },
            )
        return gone

    def audit(self, actor: str, action: str, obj: str, outcome: str, details: dict[str, Any]) -> bool:
        """Write one record to the trail, after those still waiting for it. False when the trail cannot be
        written: the record waits with the others (:attr:`backlog`), in order."""
        return self.backlog.write([Event(actor=actor, action=action, object=obj, outcome=outcome, details=details)])

    # operations

    def reserve(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        _only(args, {"project", "dataset", "epsilon", "delta", "run_id"})
        member = self.member(peer)
        run_id = args.get("run_id", "")
        if not isinstance(run_id, str) or len(run_id) > MAX_RUN_ID:
            raise ChannelError(f"run_id must be a string of at most {MAX_RUN_ID} characters", BAD_REQUEST)
        if run_id.lower().startswith(JOB_RUN_PREFIX):
            raise ChannelError(f"run ids starting {JOB_RUN_PREFIX!r} belong to training jobs", BAD_REQUEST)
        return self._reserve(peer, member, args, run_id, {})

    def _reserve(
        self, peer: Peer, member: Member, args: dict[str, Any], run_id: str, extra: dict[str, Any]
    ) -> dict[str, Any]:
        project, dataset = _str_arg(args, "project"), _str_arg(args, "dataset")
        epsilon, delta = _num_arg(args, "epsilon"), _num_arg(args, "delta")
        if project not in member.projects:
            who = f"{member.username} is" if extra.get("job") else "you are"
            charges = (
                "a job charges only its user's projects"
                if extra.get("job")
                else ("a kernel can charge only its user's projects")
            )
            raise ChannelError(f"{who} not a member of project {project!r}; {charges}", FORBIDDEN)
        self.sweep()
        if not self.backlog.flush():
            raise ChannelError(NOT_RECORDED, "unavailable")
        obj = f"{project}/{dataset}"
        try:
            rid = self.ledger.reserve(
                project,
                dataset,
                epsilon,
                delta,
                user=member.username,
                run_id=run_id,
                pid=peer.pid,
                pid_start=peer.start if peer.delegated else process_start(peer.pid),
                pod=peer.pod,
            )
        except BudgetExceeded as e:
            self.audit(
                member.username,
                "ledger.reserve",
                obj,
                "denied",
                {"project": project, "epsilon": epsilon, "delta": delta, "reason": str(e), **extra},
            )
            raise ChannelError(str(e), "budget_exceeded") from None
        except LedgerError as e:
            raise ChannelError(str(e), e.code) from None
        row = self.ledger.run(rid)
        assert row is not None  # reserve() committed this row above, and the ledger never deletes a run
        details = {"project": project, "epsilon": epsilon, "delta": delta, "reservation": row["id"], "pid": peer.pid}
        if peer.delegated:
            details["pod"] = peer.pod
        if not self.audit(member.username, "ledger.reserve", obj, "ok", {**details, **extra}):
            self._release(rid, member.username, obj, project, extra)
            raise ChannelError(NOT_RECORDED, "unavailable")
        return {"reservation": row["id"], **public_run(row), "budget": self._dataset_budget(project, dataset)}

    def _release(self, rid: str, user: str, obj: str, project: str, extra: dict[str, Any]) -> None:
        """Close a reservation whose record the trail could not take, spending nothing: no run may use it."""
        released = self.ledger.settle(rid, 0.0, {}, delta_spent=0.0)
        self.log.warning("ledger: reservation %s released unused: the audit trail could not record it", rid)
        self.audit(
            user,
            "ledger.settle",
            obj,
            "ok",
            {
                "project": project,
                "reservation": rid,
                "state": "released",
                "epsilon_spent": released["epsilon_spent"],
                "reason": "the audit trail could not record the reservation",
                **extra,
            },
        )

    def pod_report(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """The processes a pod's relay sees alive now, forwarded by the gateway on the relay's behalf (origin
        ``relay``, the pod its token's); from no one else."""
        if not peer.delegated or peer.origin != "relay":
            raise ChannelError(
                "only a pod's relay, through the workspace's gateway, reports its live processes", FORBIDDEN
            )
        _only(args, {"kernels"})
        self.pods.report(peer.pod, _kernels(args.get("kernels")))
        return {"pod": peer.pod}

    def settle(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        _only(args, {"reservation", "epsilon_spent", "delta_spent", "record"})
        member = self.member(peer)
        row = self.ledger.run(self._reservation(args))
        if row is not None and row["run_id"].startswith(JOB_RUN_PREFIX):
            raise ChannelError(
                "this reservation is a training job's: the jobs runner settles it with what its accountant spent",
                FORBIDDEN,
            )
        return self._settle(args, member.username, {})

    def _reservation(self, args: dict[str, Any]) -> str:
        reservation = args.get("reservation")
        if not isinstance(reservation, str):
            raise ChannelError("reservation must be the id that reserve returned", BAD_REQUEST)
        return reservation

    def _settle(self, args: dict[str, Any], user: str, extra: dict[str, Any]) -> dict[str, Any]:
        reservation = self._reservation(args)
        epsilon_spent = _num_arg(args, "epsilon_spent")
        delta_spent = _num_arg(args, "delta_spent", required=False)
        record = args.get("record") or {}
        try:
            row = self.ledger.settle(reservation, epsilon_spent, record, delta_spent=delta_spent, user=user)
        except LedgerError as e:
            raise ChannelError(str(e), e.code) from None
        self.audit(
            user,
            "ledger.settle",
            f"{row['project']}/{row['dataset']}",
            "ok",
            {
                "project": row["project"],
                "reservation": reservation,
                "epsilon_spent": row["epsilon_spent"],
                "delta_spent": row["delta_spent"],
                "weights_sha256": row["weights_sha256"],
                **extra,
            },
        )
        return {**public_run(row), "budget": self._dataset_budget(row["project"], row["dataset"])}

    # the training-jobs runner

    def _runner(self, peer: Peer) -> None:
        if not peer.is_root:
            raise ChannelError("only the training-jobs runner reserves and settles for a job", FORBIDDEN)

    def reserve_job(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """The runner reserves a job's budget for the researcher who submitted it (``user``)."""
        _only(args, {"project", "dataset", "epsilon", "delta", "user", "job_id"})
        self._runner(peer)
        user, job_id = args.get("user"), args.get("job_id")
        member = self.registry.by_username(user) if isinstance(user, str) else None
        if member is None:
            raise ChannelError(f"user must be a workspace user's name, got {user!r}", "unknown_user")
        if not isinstance(job_id, str) or not job_id or len(JOB_RUN_PREFIX + job_id) > MAX_RUN_ID:
            raise ChannelError("job_id must be the job's id", BAD_REQUEST)
        return self._reserve(peer, member, args, JOB_RUN_PREFIX + job_id, {"job": job_id})

    def renew_job(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """The runner says its job still runs: a reservation it made unseen (pid 0) lives on (:class:`Leases`)."""
        _only(args, {"reservation"})
        self._runner(peer)
        rid = self._reservation(args)
        row = self.ledger.run(rid)
        if row is None or not row["run_id"].startswith(JOB_RUN_PREFIX):
            raise ChannelError("renew_job renews a training job's reservation only", BAD_REQUEST)
        if row["state"] != "reserved":
            raise ChannelError(f"reservation {rid} is {row['state']}, not open: it cannot be renewed", "not_open")
        self.leases.renew(rid)
        return {"reservation": rid, "state": row["state"]}

    def settle_job(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """The runner settles a job's reservation with what its accountant spent."""
        _only(args, {"reservation", "epsilon_spent", "delta_spent", "record"})
        self._runner(peer)
        row = self.ledger.run(self._reservation(args))
        if row is None or not row["run_id"].startswith(JOB_RUN_PREFIX):
            raise ChannelError("settle_job settles a training job's reservation only", BAD_REQUEST)
        settled = self._settle(args, row["username"], {"job": row["run_id"].removeprefix(JOB_RUN_PREFIX)})
        self.leases.forget([row["id"]])
        return settled

    def _dataset_budget(self, project: str, dataset: str) -> dict[str, Any]:
        return next(b for b in self.ledger.budget(project) if b["dataset"] == dataset)

    def budget(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        _only(args, {"project"})
        project = _str_arg(args, "project", required=False)
        projects = self.readable_projects(peer)
        if project is not None:
            self._project_for(peer, project)
            projects = [project]
        self.sweep()
        user = None if peer.is_root else self.member(peer).username
        return {
            "user": user or "root",
            "projects": {p: self.ledger.budget(p, user) for p in projects},
        }

    def total(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """The total budget of one dataset as the ledger applies it: ``{"epsilon", "delta", "source"}``."""
        _only(args, {"project", "dataset"})
        project, dataset = _str_arg(args, "project"), _str_arg(args, "dataset")
        self._project_for(peer, project)
        for row in self.ledger.budget(project):
            if row["dataset"] == dataset:
                return {
                    "project": project,
                    "dataset": dataset,
                    "epsilon": row["epsilon_total"],
                    "delta": row["delta_total"],
                    "source": row["source"],
                }
        raise ChannelError(f"project {project!r} has no dataset {dataset!r}", "unknown_dataset")

    def records(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> list[dict[str, Any]]:
        _only(args, {"project", "dataset"})
        project = _str_arg(args, "project", required=False)
        dataset = _str_arg(args, "dataset", required=False)
        projects = self.readable_projects(peer)
        if project is not None:
            self._project_for(peer, project)
            return [public_run(r) for r in self.ledger.runs(project, dataset)]
        return [
            public_run(r)
            for p in projects
            for r in self.ledger.runs(p, dataset)
            if dataset is None or r["dataset"] == dataset
        ]

    def record_by_hash(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any] | None:
        _only(args, {"sha256"})
        sha = args.get("sha256")
        if not isinstance(sha, str):
            raise ChannelError("sha256 must be a string of 64 hex digits", BAD_REQUEST)
        try:
            row = self.ledger.record_by_hash(sha)
        except LedgerError as e:
            raise ChannelError(str(e), e.code) from None
        if row is None or row["project"] not in self.readable_projects(peer):
            return None
        return public_run(row)


def serve(site, log: logging.Logger) -> None:
    """Serve ``<run_dir>/ledger.sock`` (and the stewards' page if the hub gave a URL) until SIGTERM/SIGINT."""
    ledger = Ledger(site)
    service = LedgerService(site, ledger, Registry.for_state_dir(site.state_dir), log)
    path = Path(socket_path(site, "ledger"))
    server = ChannelServer(
        path, service.handlers(), name="ledger", **channel_options(site, "ledger", partial(emit, site))
    )
    stop = StopSignal()
    server.start_in_thread()
    log.info("ledger: %s, listening on %s", ledger.db.__class__.__name__.strip("_"), path)
    web = None
    url = os.environ.get("JUPYTERHUB_SERVICE_URL", "")
    try:
        if url:
            from paitient.services.ledger.web import run_in_thread

            web = run_in_thread(site, ledger, url, log)
        while not stop.wait(SWEEP_SECONDS):
            try:
                service.sweep()
            except Exception:
                log.exception("ledger: sweep failed")
    finally:
        if web is not None:
            web.stop()
        server.shutdown()
        server.server_close()
        log.info("ledger: stopped")
