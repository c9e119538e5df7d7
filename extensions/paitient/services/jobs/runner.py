"""The runner's workers: each takes the oldest queued job and carries it from the data to a signed record.

For one job, in order (a failure at any step ends the job ``failed`` with the reason, its reservation
settled in full):

0. its start is recorded in the audit trail (``jobs.run``, state ``running``); while the trail cannot take the
   record the job stays queued, untouched, and the worker tries again at its pace (:data:`PACE`);
1. the dataset's current version is fixed, its rows prepared and split with a seed the runner draws;
2. the noise multiplier for the target epsilon is planned for the training rows; the budget is reserved
   for the researcher with the ledger (``reserve_job``), at the delta the dataset's budget allows a run;
3. the worker trains in the sandbox (:mod:`.execute`) from parameters the runner initialises with a seed it
   draws, or from a pretrained checkpoint of the operator's registry (:mod:`.checkpoints`) that the runner
   reads and checks against the graph before step 2; the job's progress (step, epsilon spent, loss) is
   recorded as it goes, and a cancel stops it;
4. the weights are checked against the graph (every parameter, its shape and dtype, nothing else), the
   epsilon is the runner's own accountant's for the steps of the plan, and the record is signed;
5. weights and record are published in ``<state_dir>/jobs/out/<job>/`` (atomically), the end is recorded in
   the audit trail (retried until it is), then the reservation is settled with what the accountant spent, and
   the job is ``done``.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from paitient import __version__
from paitient.catalogue import find, scan
from paitient.channel import ChannelError
from paitient.fsutil import atomic_write_bytes, atomic_write_json
from paitient.registry import Registry
from paitient.rules import training_record
from paitient.rules.budget import default_delta
from paitient.services.jobs import keys
from paitient.services.jobs.data import Prepared, prepare
from paitient.services.jobs.execute import ExecutionFailed, run_worker
from paitient.services.jobs.store import Job, JobStore
from paitient.services.ledger.api import JobsLedger

INIT_SCHEME = "default"
TRAINED_HOW: dict[str, tuple[str | bool, ...]] = {
    "device": ("cpu", "cuda"),
    "clipping": ("fast", "exact"),
    "graph": (True, False),
}
"""What the worker's last report may say of how it trained (``graph``: whether its steps ran as a captured
CUDA graph); the audit record of a finished job keeps it."""
METRIC_DIGITS = 2
PACE = 2.0
"""Seconds between a worker's looks at the queue when it is empty, and between tries of an audit record."""
WAITING_FOR_TRAIL = (
    "waiting: the audit trail cannot record the job's start right now; it starts once it can "
    "(tell the workspace operator if this lasts)"
)


class JobFailed(RuntimeError):
    """A job cannot go on; the message is its reason, for the researcher."""


class Runner:
    def __init__(
        self,
        site: Any,
        store: JobStore,
        registry: Registry,
        *,
        wake: threading.Event | None = None,
        log: logging.Logger | None = None,
    ):
        self.site, self.store, self.registry = site, store, registry
        self.wake = wake or threading.Event()
        self.log = log or logging.getLogger("paitient.services.jobs")
        self.concurrency = int(site.jobs.concurrency)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.signing_key = keys.ensure_signing_key(site)

    def start(self) -> None:
        for i in range(self.concurrency):
            t = threading.Thread(target=self._loop, name=f"jobs-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        for t in self._threads:
            t.join(5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            job = self.store.claim()
            if job is not None and not self._record_start(job):
                job = None  # back in the queue; the next try at the runner's pace
            if job is None:
                self.wake.wait(PACE)
                self.wake.clear()
                continue
            self.run(job)

    # -- one job ---------------------------------------------------------------------------------------

    def run(self, job: Job) -> Job:
        """Carry ``job`` (claimed: ``running``, its start recorded) to its end; returns it as it ended.

        The end is recorded before it takes effect: the ``jobs.run`` record of a job that is done, failed or
        cancelled is written (retried at the runner's pace while the trail cannot take it) before the
        reservation is settled and the job leaves ``running``. A runner stopped while it waits leaves the job
        ``running``: at the next start it is ``failed`` and the ledger counts its reservation in full."""
        reservation = ""
        ledger = JobsLedger(self.site.run_dir)
        renewing = _Renewal(self.log, job.id)
        try:
            program = self.store.graph_path(job.graph_sha256).read_bytes()
            initialisation, init_weights = self._initialisation(job, program)
            data_file, version = self._version(job)
            prepared = prepare(data_file, job.spec, split_seed=_seed())
            _check_fits(program, prepared, job.spec["loss"])  # a job that can never run reserves nothing
            from paitient.services.jobs.train import TrainSpec, plan

            total = self._dataset_total(job)
            delta = default_delta(total.delta, len(prepared.x_train))
            train_spec = TrainSpec(
                epochs=job.spec["epochs"],
                batch_size=job.spec["batch_size"],
                lr=job.spec["lr"],
                optimizer=job.spec["optimizer"],
                momentum=job.spec.get("momentum", 0.0),  # (a job queued before momentum was asked for)
                max_grad_norm=job.spec["max_grad_norm"],
                target_epsilon=job.spec["target_epsilon"],
                delta=delta,
                accountant="prv",
                loss=job.spec["loss"],
                seed=_seed(),
            )
            the_plan = plan(train_spec, len(prepared.x_train))
            reservation = ledger.reserve(
                user=job.username,
                job_id=job.id,
                project=job.project,
                dataset=job.dataset,
                epsilon=train_spec.target_epsilon,
                delta=delta,
            )
            self.store.set_reservation(job.id, reservation)
            renewing.start(ledger, reservation)
            outcome = run_worker(
                program=program,
                arrays=_arrays(prepared),
                plan={
                    "spec": _spec_dict(train_spec),
                    "plan": _spec_dict(the_plan),
                    "init": initialisation,
                    "device": self.site.jobs.device,
                    "classes": prepared.classes,
                },
                account=self.site.jobs.account,
                timeout=float(self.site.jobs.timeout),
                memory_mb=int(self.site.jobs.memory_mb),
                on_progress=lambda p: self.store.progress(job.id, _progress(p, the_plan.steps)),
                work_root=self.site.state_dir / "jobs-work",
                state_dir=self.site.state_dir,
                init_weights=init_weights,
            )
            epsilon = _spent(train_spec, the_plan)
            weights_sha256 = _check_weights(program, outcome.weights)
            record = {
                "job_id": job.id,
                "project": job.project,
                "dataset": job.dataset,
                "dataset_version": version,
                "dataset_sha256": prepared.dataset_sha256,
                "n_train": len(prepared.x_train),
                "n_holdout": len(prepared.x_holdout),
                "features": prepared.features,
                "target": job.spec["target"],
                "preprocessing": prepared.preprocessing,
                "graph_sha256": job.graph_sha256,
                "initialisation": initialisation,
                "sampling_rate": the_plan.sample_rate,
                "noise_multiplier": the_plan.noise_multiplier,
                "max_grad_norm": train_spec.max_grad_norm,
                "steps": the_plan.steps,
                "epsilon": epsilon,
                "delta": delta,
                "accountant": train_spec.accountant,
                "weights_sha256": weights_sha256,
                "metrics": _metrics(outcome.report.get("metrics")),
                "runner_version": __version__,
                # to the minute: the kernel chooses when a job starts, so seconds would be bits of its choice
                "finished": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:00Z"),
            }
            envelope = training_record.sign(record, self.signing_key)
            out = self.store.out_dir(job.id)
            out.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write_bytes(out / "model.safetensors", outcome.weights, mode=0o600)
            atomic_write_json(out / "record.json", envelope, mode=0o600)
            trained = _trained_how(outcome.report)
            details = {"epsilon": epsilon, "weights_sha256": weights_sha256, "steps": the_plan.steps, **trained}
            if not self._record_end(job, "done", "ok", details):
                return self.store.get(job.id)
            renewing.stop()
            ledger.settle(reservation, epsilon, _ledger_record(record))
            return self.store.finish(job.id, "done")
        except Exception as e:
            # Only the runner's own messages reach the job's reason and the audit trail: a library's (pandas',
            # numpy's, torch's) may quote the value it failed on, a row's pseudonym or note.
            reason = str(e) if _own_message(e) else ""
            if not reason:
                self.log.exception("jobs: %s failed", job.id)
                reason = f"the runner failed ({type(e).__name__}); the operator's log has the details"
            state = "cancelled" if reason == "cancelled" else "failed"
            if not self._record_end(job, state, "ok" if state == "cancelled" else "error", {"reason": reason}):
                return self.store.get(job.id)
            if reservation:
                renewing.stop()
                self._settle_in_full(ledger, reservation, job)
            return self.store.finish(job.id, state, reason)
        finally:
            renewing.stop()

    def _initialisation(self, job: Job, program: bytes) -> tuple[dict[str, Any], bytes | None]:
        """How the job's parameters start, as the record states it, and the values to start from when that is
        a checkpoint: read again from the registry (the file the job was submitted with, unchanged on disk),
        its parameters exactly the graph's, made float32. Refused before any budget is reserved."""
        name = job.spec.get("checkpoint")
        if name is None:
            return {"scheme": job.spec.get("init", INIT_SCHEME), "seed": _seed()}, None
        import torch
        from safetensors.torch import save

        from paitient.services.jobs.checkpoints import CheckpointRefused, CheckpointRegistry, match
        from paitient.services.jobs.graph import load_graph

        try:
            entry, values = CheckpointRegistry(self.site.state_dir).load(name, job.spec.get("checkpoint_sha256"))
            match({k: v.shape for k, v in values.items()}, load_graph(program).params)
        except CheckpointRefused as e:
            raise JobFailed(f"checkpoint {name!r}: {e}") from None
        tensors = {k: torch.from_numpy(v.copy()) for k, v in values.items()}
        return {"checkpoint": entry.sha256, "name": entry.name}, save(tensors)

    def _version(self, job: Job) -> tuple[Path, int]:
        info = find([i for i in scan(self.site.data_root) if i.project == job.project], job.dataset, job.project)
        folder = info.path.resolve()  # the version `current` names now, fixed for the whole job
        return folder / "data.parquet", int(info.version or 0)

    def _dataset_total(self, job: Job) -> Any:
        from paitient.services.ledger.api import LedgerReader

        return LedgerReader(self.site.run_dir).total(job.project, job.dataset)

    def _settle_in_full(self, ledger: JobsLedger, reservation: str, job: Job) -> None:
        try:
            ledger.settle(reservation, float(job.spec["target_epsilon"]), {"note": "job did not finish"})
        except Exception as e:  # the reservation stays; the ledger counts it in full once the runner is gone
            self.log.error("jobs: could not settle %s of %s: %s", reservation, job.id, e)

    def _record_start(self, job: Job) -> bool:
        """Write the ``jobs.run`` record of the job's start (state ``running``), the first thing a worker does
        with a job it claimed. When the trail cannot take it, the job goes back in the queue untouched,
        with a reason its owner sees, and False: nothing of it runs unrecorded."""
        try:
            self._emit(job, "running", "ok", {})
        except Exception as e:
            self.log.error("jobs: start of %s not recorded, back in the queue: %s", job.id, e)
            self.store.requeue(job.id, WAITING_FOR_TRAIL)
            return False
        return True

    def _record_end(self, job: Job, state: str, outcome: str, details: dict[str, Any]) -> bool:
        """Write the ``jobs.run`` record of the job's end (``state``), trying again at the runner's pace while
        the trail cannot take it; False if the runner is stopped first."""
        failures = 0
        while True:
            try:
                self._emit(job, state, outcome, details)
                return True
            except Exception as e:
                if failures == 0:
                    self.log.error("jobs: end of %s (%s) not recorded, trying again: %s", job.id, state, e)
                failures += 1
            if self._stop.wait(PACE):
                self.log.error("jobs: stopped before the end of %s was recorded; it counts as failed", job.id)
                return False

    def _emit(self, job: Job, state: str, outcome: str, details: dict[str, Any]) -> None:
        from paitient.services.audit import emit

        emit(
            self.site,
            actor=job.username,
            action="jobs.run",
            object=job.id,
            outcome=outcome,
            details={"project": job.project, "dataset": job.dataset, "state": state, **details},
        )


class _Renewal:
    """Renews a running job's reservation every :data:`~paitient.services.ledger.api.RENEW_SECONDS` until
    stopped: the ledger keeps one it cannot tie to this process (another pid namespace) while it is renewed."""

    def __init__(self, log: Any, job_id: str):
        self.log = log
        self.job_id = job_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, ledger: JobsLedger, reservation: str) -> None:
        from paitient.services.ledger.api import RENEW_SECONDS

        def renew() -> None:
            while not self._stop.wait(RENEW_SECONDS):
                try:
                    ledger.renew(reservation)
                except ChannelError as e:
                    self.log.warning("jobs: %s: the ledger did not renew %s: %s", self.job_id, reservation, e)

        self._thread = threading.Thread(target=renew, name=f"renew-{self.job_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _trained_how(report: dict[str, Any]) -> dict[str, str | bool]:
    """The worker's report's :data:`TRAINED_HOW` facts that hold one of their allowed values, of the same type
    (JSON's 1 is not ``True``); others are left out."""
    facts: dict[str, str | bool] = {}
    for key, allowed in TRAINED_HOW.items():
        value = report.get(key)
        for a in allowed:
            if type(value) is type(a) and value == a:
                facts[key] = a
    return facts


def _own_message(e: Exception) -> bool:
    """Whether ``e``'s message is the runner's own, worded for the researcher and quoting no row: the errors
    the runner, its checks and its services raise. Any other exception (a plain ``ValueError`` or
    ``IndexError`` from pandas, numpy or torch) is reported by its type only."""
    from paitient.catalogue import DatasetNotFound
    from paitient.rules.jobspec import SpecError
    from paitient.services.jobs.checkpoints import CheckpointRefused
    from paitient.services.jobs.graph import GraphRefused
    from paitient.services.jobs.store import JobError
    from paitient.services.jobs.train import TrainError

    own = (JobFailed, ExecutionFailed, ChannelError, SpecError, GraphRefused, CheckpointRefused, TrainError, JobError)
    return isinstance(e, (*own, DatasetNotFound))


def _check_fits(program: bytes, prepared: Prepared, loss: str) -> None:
    """Refuse a job whose graph cannot take its rows or give its loss what it needs: the input's width against
    the features, the output's against the classes. Such a job would fail in the sandbox after its budget was
    reserved, which a failed job spends in full."""
    from paitient.services.jobs.graph import load_graph, row_output_shape

    graph = load_graph(program)
    features = len(prepared.features)
    if graph.input_shape != (features,):
        raise JobFailed(
            f"the model takes rows of shape {graph.input_shape}, and the job has {features} features: export it "
            f"with an input of shape (batch, {features}), or choose the features it was made for"
        )
    out = row_output_shape(graph)
    width = math.prod(out)
    if loss == "cross_entropy" and len(out) != 1:
        raise JobFailed(
            f"cross_entropy needs one logit per class in each row's output (batch, classes), and the model gives "
            f"{out} per row: end it with a Linear layer of one output per class"
        )
    if loss == "cross_entropy" and width < prepared.classes:
        raise JobFailed(
            f"the target has more classes than the model's {width} outputs: give the last layer one output per "
            "class, or choose another target (or mse, for a number)"
        )
    if loss in ("bce_with_logits", "smooth_hinge") and width != 1:
        raise JobFailed(
            f"{loss} needs one output per row (the logit or score), and the model gives {out}: give the last "
            "layer one output"
        )


def _seed() -> int:
    """A seed the runner draws for a job (split, initialisation, sampling): 63 random bits."""
    return secrets.randbits(63)


def _arrays(p: Prepared) -> dict[str, Any]:
    return {"x_train": p.x_train, "y_train": p.y_train, "x_holdout": p.x_holdout, "y_holdout": p.y_holdout}


def _spec_dict(spec: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(spec)


def _progress(report: dict[str, Any], steps: int) -> dict[str, Any]:
    """A worker's progress report as bounded numbers: step, steps, epsilon so far, loss."""
    out: dict[str, Any] = {"steps": steps, "at": time.time()}
    for key in ("step", "epoch"):
        value = report.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 10**9:
            out[key] = value
    for key in ("epsilon", "loss"):
        value = report.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and abs(value) < 1e12:
            out[key] = float(f"{value:.4g}")
    return out


def _metrics(raw: Any) -> dict[str, float]:
    """The worker's metrics as the record keeps them: at most 32 names, finite numbers to 2 significant digits."""
    if not isinstance(raw, dict):
        raise JobFailed("the worker reported no metrics")
    out: dict[str, float] = {}
    for key, value in list(raw.items())[: training_record.MAX_METRICS]:
        if isinstance(key, str) and isinstance(value, int | float) and not isinstance(value, bool):
            if abs(value) <= 1e9 and value == value:
                out[key[:64]] = float(f"{value:.{METRIC_DIGITS}g}")
    return out


def _spent(spec: Any, the_plan: Any) -> float:
    """Epsilon as the runner's own accountant has it for the plan's steps at the plan's noise and rate."""
    from paitient.services.jobs.train import epsilon_after

    return float(
        epsilon_after(the_plan.noise_multiplier, the_plan.sample_rate, the_plan.steps, spec.delta, spec.accountant)
    )


def _check_weights(program: bytes, weights: bytes) -> str:
    """The SHA-256 of ``weights`` once it holds exactly the graph's parameters (names, shapes, dtypes)."""
    import hashlib

    from safetensors import SafetensorError
    from safetensors.torch import load

    from paitient.services.jobs.graph import load_graph

    try:
        tensors = load(weights)
    except (SafetensorError, ValueError) as e:
        raise JobFailed(f"the worker's weights are not a safetensors file: {e}") from None
    expected = load_graph(program).params
    got = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    want = {name: (tuple(shape), dtype) for name, (shape, dtype) in expected.items()}
    if got != want:
        raise JobFailed("the worker's weights do not match the model's parameters")
    return hashlib.sha256(weights).hexdigest()


def _ledger_record(record: dict[str, Any]) -> dict[str, Any]:
    """What the ledger keeps of a job's record (its own fields, scalars only)."""
    keep = ("dataset", "dataset_version", "epsilon", "delta", "noise_multiplier", "steps", "max_grad_norm")
    out = {k: record[k] for k in keep}
    out.update(
        sample_rate=record["sampling_rate"],
        accountant=record["accountant"],
        weights_sha256=record["weights_sha256"],
        mode="certified job",
        dataset_size=record["n_train"],
        note=f"job {record['job_id']}",
    )
    return out
