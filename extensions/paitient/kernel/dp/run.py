"""``make_private``: one private training run, from budget reservation to the settled training record.

Life of a run:

1. the model is checked (:mod:`paitient.kernel.dp.validate`), the mode chosen (:mod:`paitient.kernel.dp.modes`);
2. the noise multiplier for ``target_epsilon`` after ``epochs`` passes is found with Opacus' PRV
   accountant, exactly as Opacus' ``make_private_with_epsilon`` does;
3. ``target_epsilon`` and ``target_delta`` are **reserved** in the privacy ledger (refused, with the
   numbers, when the dataset's budget has not enough left) — before any training step;
4. training: every optimizer step is counted for the accountant; a step beyond the planned
   ``epochs * len(data_loader)`` is refused (the reservation covers those and no more);
5. the run is **settled**, with the accountant's epsilon for the steps actually taken and the training
   record (including the canonical hash of the final weights), when the returned data loader finishes
   its last planned epoch, or on ``run.finish()``, or when a ``with`` block around the run ends —
   whichever comes first. After that the optimizer refuses further steps.
   If the kernel dies before, the ledger counts the whole reservation as spent.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from opacus.accountants import PRVAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from paitient.kernel.dp.fast import FastClipper, FastDPOptimizer
from paitient.kernel.dp.modes import choose_mode
from paitient.kernel.dp.sampling import poisson_loader
from paitient.kernel.dp.validate import DPModelError, check_model
from paitient.kernel.dp.weights import weights_sha256
from paitient.kernel.ledger import LedgerClient, LedgerUnavailable


class RunFinished(RuntimeError):
    """The run has settled (or used every step it reserved); start a new ``make_private`` to train more."""


@contextlib.contextmanager
def _prv_quiet():
    """Hide the RDP order-range warning that PRV's domain sizing raises: the RDP bound there only sizes the
    PRV grid, the PRV epsilon stays within its error bound, and the researcher has no alphas to expand."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha", category=UserWarning)
        yield


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def dataset_version(project: str, dataset: str, data_dir: str | os.PathLike[str] | None = None) -> int | None:
    """The published version of ``/data/<project>/<dataset>`` from its manifest (None when there is none)."""
    base = Path(data_dir if data_dir is not None else os.environ.get("PAITIENT_DATA_DIR", "/data"))
    for manifest in (
        base / project / dataset / "current" / "manifest.json",
        base / project / dataset / "manifest.json",
    ):
        try:
            version = json.loads(manifest.read_text()).get("version")
        except (OSError, ValueError):
            continue
        if isinstance(version, int):
            return version
    return None


def resolve_target(budget: dict[str, Any], project: str | None, dataset: str | None) -> tuple[str, str, dict]:
    """Pick project and dataset (given, or the only one there is) and return that dataset's budget row."""
    projects = budget["projects"]
    if project is None:
        if len(projects) != 1:
            raise ValueError(
                f"say which project to charge: make_private(..., project=...); yours: "
                f"{', '.join(sorted(projects)) or 'none'}"
            )
        project = next(iter(projects))
    if project not in projects:
        raise ValueError(f"you are not a member of project {project!r}; yours: {', '.join(sorted(projects)) or 'none'}")
    rows = {r["dataset"]: r for r in projects[project]}
    if dataset is None:
        if len(rows) != 1:
            raise ValueError(
                f"say which dataset you train on: make_private(..., dataset=...); "
                f"{project}'s datasets: {', '.join(rows)}"
            )
        dataset = next(iter(rows))
    if dataset not in rows:
        raise ValueError(f"project {project!r} has no dataset {dataset!r}; its datasets: {', '.join(rows)}")
    return project, dataset, rows[dataset]


class _RunLoader:
    """The private data loader, telling the run where epochs end (the last one settles the run)."""

    def __init__(self, run: PrivateRun, loader: DataLoader):
        self._run = run
        self._loader = loader

    def __iter__(self):
        self._run._start_progress()
        yield from self._loader
        self._run._epoch_done()

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class PrivateRun:
    """What :func:`make_private` returns. Unpacks as ``model, optimizer, criterion, data_loader``."""

    def __init__(self, **kw: Any):
        self.model: nn.Module = kw["model"]
        self.optimizer: torch.optim.Optimizer = kw["optimizer"]
        self.criterion = kw["criterion"]
        self.mode: str = kw["mode"]
        self.mode_reason: str = kw["mode_reason"]
        self.project: str = kw["project"]
        self.dataset: str = kw["dataset"]
        self.dataset_version: int | None = kw["dataset_version"]
        self.target_epsilon: float = kw["target_epsilon"]
        self.target_delta: float = kw["target_delta"]
        self.noise_multiplier: float = kw["noise_multiplier"]
        self.sample_rate: float = kw["sample_rate"]
        self.max_grad_norm: float = kw["max_grad_norm"]
        self.epochs: int = kw["epochs"]
        self.planned_steps: int = kw["planned_steps"]
        self.expected_batch_size: int = kw["expected_batch_size"]
        self.dataset_size: int = kw["dataset_size"]
        self.loss_reduction: str = kw["loss_reduction"]
        self.accountant = kw["accountant"]
        self.reservation: str = kw["reservation"]
        self.run_id: str = kw["run_id"]
        self.started = _now()
        self.steps = 0
        self.epochs_done = 0
        self.record: dict[str, Any] | None = None
        self._ledger: LedgerClient = kw["ledger"]
        self._clipper: FastClipper | None = kw.get("clipper")
        self._progress = kw["progress"]
        self._bar = None
        self._eps_shown = 0.0
        self._eps_cost = 0.0
        self.data_loader = _RunLoader(self, kw["data_loader"])

    def __iter__(self):
        return iter((self.model, self.optimizer, self.criterion, self.data_loader))

    def __enter__(self) -> PrivateRun:
        return self

    def __exit__(self, *exc) -> None:
        self.finish()

    def __repr__(self) -> str:
        return (
            f"<PrivateRun {self.project}/{self.dataset} mode={self.mode} steps={self.steps}/{self.planned_steps} "
            f"noise_multiplier={self.noise_multiplier:.4g} target_epsilon={self.target_epsilon:g}"
            f"{' settled' if self.record else ''}>"
        )

    @property
    def finished(self) -> bool:
        return self.record is not None

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far (PRV accountant, at ``target_delta``)."""
        if self.steps == 0:
            return 0.0
        with _prv_quiet():
            return float(self.accountant.get_epsilon(delta=self.target_delta))

    # -- hooks from the optimizer and the loader --------------------------------------------------

    def _before_step(self) -> None:
        if self.record is not None:
            raise RunFinished(
                f"this private run has settled ({self.steps} steps, epsilon {self.record['epsilon_spent']:.4g}); "
                "call dp.make_private again for more training (it reserves new budget)"
            )
        if self.steps >= self.planned_steps:
            raise RunFinished(
                f"this run has taken all {self.planned_steps} steps it reserved budget for "
                f"({self.epochs} epochs x {self.planned_steps // self.epochs} batches); call run.finish()"
            )

    def _after_step(self, batch_size: int = 0) -> None:
        self.steps += 1
        if self.mode == "fast":
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        if self._bar is not None:
            self._bar.update(1)

    def _start_progress(self) -> None:
        if self._progress and self._bar is None and self.record is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self.planned_steps,
                unit="step",
                desc=f"private training ({self.mode}) on {self.project}/{self.dataset}",
            )
            self._bar.set_postfix_str(f"epsilon 0 of {self.target_epsilon:g}")

    def _epoch_done(self) -> None:
        self.epochs_done += 1
        if self.epochs_done >= self.epochs and self.record is None:
            self.finish()
        elif self._bar is not None and time.monotonic() - self._eps_shown >= max(2.0, 5 * self._eps_cost):
            # the accountant takes 0.1 s to seconds: shown at most every 2 s and <= 20% of the time
            t0 = time.monotonic()
            self._bar.set_postfix_str(f"epsilon {self.epsilon:.3g} of {self.target_epsilon:g}")
            self._eps_shown = time.monotonic()
            self._eps_cost = self._eps_shown - t0

    # -- the end -----------------------------------------------------------------------------------

    def training_record(self) -> dict[str, Any]:
        eps = self.epsilon
        return {
            "dataset": self.dataset,
            "dataset_version": self.dataset_version,
            "epsilon": eps,
            "delta": self.target_delta if self.steps else 0.0,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "planned_steps": self.planned_steps,
            "epochs": self.epochs,
            "max_grad_norm": self.max_grad_norm,
            "mode": self.mode,
            "accountant": "prv",
            "weights_sha256": weights_sha256(self.model),
            "model": type(_unwrap(self.model)).__name__,
            "batch_size": self.expected_batch_size,
            "dataset_size": self.dataset_size,
            "loss_reduction": self.loss_reduction,
            "started": self.started,
            "finished": _now(),
        }

    def finish(self) -> dict[str, Any]:
        """Settle the run in the ledger (idempotent) and return its ledger entry with the training record."""
        if self.record is not None:
            return self.record
        record = self.training_record()
        try:
            self.record = self._ledger.settle(self.reservation, record["epsilon"], record, delta_spent=record["delta"])
        except LedgerUnavailable as e:
            raise LedgerUnavailable(
                f"{e}. This run ({self.steps} steps, epsilon {record['epsilon']:.4g}) is not settled yet: call "
                "run.finish() again once the ledger answers; until then its whole reservation "
                f"({self.target_epsilon:g}) counts, and for good if this kernel ends first",
                e.code,
            ) from None
        if self._clipper is not None:
            self._clipper.detach()
        if self._bar is not None:
            self._bar.set_postfix_str(f"epsilon {record['epsilon']:.3g} of {self.target_epsilon:g}, settled")
            self._bar.close()
        return self.record


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "_module", None)
    return inner if isinstance(inner, nn.Module) else model


def _check_args(target_epsilon, epochs, max_grad_norm, target_delta, loss_reduction) -> None:
    if not (isinstance(target_epsilon, int | float) and math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a positive number, got {target_epsilon!r}")
    if not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"epochs must be a whole number >= 1, got {epochs!r}")
    if not (isinstance(max_grad_norm, int | float) and math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be a positive number (e.g. 1.0), got {max_grad_norm!r}")
    if target_delta is not None and not (0 < target_delta < 1):
        raise ValueError(f"target_delta must lie between 0 and 1, got {target_delta!r}")
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")


def default_delta(total_delta: float, dataset_size: int) -> float:
    """A tenth of the dataset's total delta (room for ten runs), and below 1/(10 n)."""
    return min(total_delta / 10, 1 / (10 * dataset_size))


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    *,
    target_epsilon: float,
    epochs: int,
    max_grad_norm: float,
    target_delta: float | None = None,
    project: str | None = None,
    dataset: str | None = None,
    mode: str = "auto",
    criterion: nn.Module | None = None,
    loss_reduction: str = "mean",
    progress: bool = True,
    noise_generator: torch.Generator | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    ledger: LedgerClient | None = None,
) -> PrivateRun:
    """Prepare differentially private training that spends at most ``target_epsilon`` of the dataset's budget.

    Returns a :class:`PrivateRun`; train with its ``model``, ``optimizer``, ``criterion`` and ``data_loader``
    (Poisson sampling: batch sizes vary and a batch may be empty). ``mode`` is ``auto`` (the fastest
    correct one: ``fast`` for all-Linear models, else ``ghost`` where every layer supports it and a
    ``criterion`` is given, else ``hooks``); ``run.mode`` and ``run.mode_reason`` say what was picked.
    ``target_delta`` defaults to :func:`default_delta`. ``project``/``dataset`` may be left out when
    you have only one. The ledger is reached over ``$PAITIENT_RUN_DIR/ledger.sock`` (or ``run_dir``).
    """
    _check_args(target_epsilon, epochs, max_grad_norm, target_delta, loss_reduction)
    check_model(model, optimizer)
    chosen, reason, layers = choose_mode(model, optimizer, criterion, mode)
    if not isinstance(data_loader, DataLoader):
        raise ValueError(
            f"data_loader must be a torch DataLoader, got {type(data_loader).__name__}; wrap the "
            "data in a TensorDataset and a DataLoader(dataset, batch_size=...)"
        )
    if isinstance(data_loader.dataset, IterableDataset):
        raise ValueError(
            "Poisson sampling picks rows by index: use a map-style dataset (one with len() and "
            "indexing, e.g. a TensorDataset), not an IterableDataset"
        )
    steps_per_epoch = len(data_loader)
    if steps_per_epoch == 0:
        raise ValueError("the data loader yields no batches; check the dataset and batch_size")
    n = len(data_loader.dataset)
    sample_rate = 1 / steps_per_epoch
    # Opacus' int(n * q), guarded against n * (1/n) == 0.999...: the mean divides by it
    expected_batch_size = max(1, int(n * sample_rate + 1e-9))
    planned_steps = epochs * steps_per_epoch

    client = ledger if ledger is not None else LedgerClient(run_dir)
    # all of the caller's projects, so a project that is not theirs gets the list of theirs (the service
    # would only say "forbidden")
    project, dataset, row = resolve_target(client.budget(), project, dataset)
    if target_delta is None:
        target_delta = default_delta(row["delta_total"], n)
    with _prv_quiet():
        noise_multiplier = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=sample_rate,
            steps=planned_steps,
            accountant="prv",
        )
    run_id = uuid.uuid4().hex[:12]
    reservation = client.reserve(project, dataset, target_epsilon, target_delta, run_id=run_id)["reservation"]
    try:
        parts = _private_parts(
            chosen,
            layers,
            model,
            optimizer,
            data_loader,
            criterion,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=noise_generator,
        )
    except BaseException:
        client.settle(reservation, 0.0, {"note": "make_private failed before training"}, delta_spent=0.0)
        raise
    run = PrivateRun(
        mode=chosen,
        mode_reason=reason,
        project=project,
        dataset=dataset,
        dataset_version=dataset_version(project, dataset, data_dir),
        target_epsilon=float(target_epsilon),
        target_delta=float(target_delta),
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        max_grad_norm=float(max_grad_norm),
        epochs=epochs,
        planned_steps=planned_steps,
        expected_batch_size=expected_batch_size,
        dataset_size=n,
        loss_reduction=loss_reduction,
        reservation=reservation,
        run_id=run_id,
        ledger=client,
        progress=progress,
        **parts,
    )
    opt = run.optimizer
    if isinstance(opt, FastDPOptimizer):
        opt.before_step, opt.after_step = run._before_step, run._after_step
    else:
        _guard_opacus_step(opt, run)
    if progress:  # otherwise run.mode and run.mode_reason say it
        print(
            f"paitient.kernel.dp: mode {chosen} ({reason}); noise multiplier {noise_multiplier:.4g}, "
            f"sample rate {sample_rate:.4g}, {planned_steps} steps; reserved epsilon {target_epsilon:g}, "
            f"delta {target_delta:.3g} of {project}/{dataset}"
        )
    return run


def _accounted_steps(accountant) -> int:
    return sum(int(h[-1]) for h in getattr(accountant, "history", ()))


def _guard_opacus_step(opt, run: PrivateRun) -> None:
    original = opt.step

    def step(closure=None):
        run._before_step()
        accounted = _accounted_steps(run.accountant)
        try:
            out = original(closure)
        except BaseException:
            # interrupted or failed inside the step: Opacus' accountant counts a step once its noise is added
            # (before the parameters change), so count it here too when it did
            if _accounted_steps(run.accountant) > accounted:
                run._after_step()
            raise
        run._after_step()
        return out

    opt.step = step


def _private_parts(
    mode: str,
    layers,
    model,
    optimizer,
    data_loader,
    criterion,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    loss_reduction: str,
    generator,
):
    if mode == "fast":
        loader = poisson_loader(data_loader, generator=generator)
        if loader is None:
            from opacus.data_loader import DPDataLoader

            loader = DPDataLoader.from_data_loader(data_loader, generator=generator)
        clipper = FastClipper(model, layers)
        opt = FastDPOptimizer(
            optimizer,
            clipper,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=generator,
        )
        return {
            "model": model,
            "optimizer": opt,
            "criterion": criterion,
            "data_loader": loader,
            "clipper": clipper,
            "accountant": PRVAccountant(),
        }
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant="prv")
    out = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        criterion=criterion if criterion is not None else nn.CrossEntropyLoss(),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        loss_reduction=loss_reduction,
        poisson_sampling=True,
        grad_sample_mode=mode,
        noise_generator=generator,
    )
    if mode == "ghost":
        pmodel, popt, pcrit, ploader = out
    else:
        (pmodel, popt, ploader), pcrit = out, criterion
    return {
        "model": pmodel,
        "optimizer": popt,
        "criterion": pcrit,
        "data_loader": ploader,
        "accountant": engine.accountant,
    }


__all__ = ["DPModelError", "PrivateRun", "RunFinished", "make_private", "dataset_version", "default_delta"]
