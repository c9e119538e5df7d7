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

import json
import os
import uuid
from collections.abc import Callable, Sized
from pathlib import Path
from typing import Any

import torch
from opacus.accountants import PRVAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from paitient.kernel.dp.fast import FastClipper, FastDPOptimizer
from paitient.kernel.dp.modes import choose_mode
from paitient.kernel.dp.options import LossReduction, Mode, OptionsError, RunOptions
from paitient.kernel.dp.private import Accountant, PrivateParts, PrivateRun, RunFinished, RunPlan, prv_quiet
from paitient.kernel.dp.sampling import poisson_loader
from paitient.kernel.dp.validate import DPModelError, check_model
from paitient.kernel.ledger import LedgerClient
from paitient.rules.budget import default_delta


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


def _pick(given: str | None, choices: list[str], ask: str, unknown: str) -> str:
    """``given`` when it is one of ``choices``, else the only choice there is; ValueError saying what to do."""
    listed = ", ".join(choices) or "none"
    if given is None:
        if len(choices) != 1:
            raise ValueError(f"{ask}: {listed}")
        return choices[0]
    if given not in choices:
        raise ValueError(f"{unknown}: {listed}")
    return given


def resolve_target(budget: dict[str, Any], project: str | None, dataset: str | None) -> tuple[str, str, dict[str, Any]]:
    """Pick project and dataset (given, or the only one there is) and return that dataset's budget row."""
    projects = budget["projects"]
    project = _pick(
        project,
        sorted(projects),
        "say which project to charge: make_private(..., project=...); yours",
        f"you are not a member of project {project!r}; yours",
    )
    rows = {r["dataset"]: r for r in projects[project]}
    dataset = _pick(
        dataset,
        list(rows),
        f"say which dataset you train on: make_private(..., dataset=...); {project}'s datasets",
        f"project {project!r} has no dataset {dataset!r}; its datasets",
    )
    return project, dataset, rows[dataset]


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[Any],
    *,
    target_epsilon: float,
    epochs: int,
    max_grad_norm: float,
    target_delta: float | None = None,
    project: str | None = None,
    dataset: str | None = None,
    mode: Mode = "auto",
    criterion: nn.Module | None = None,
    loss_reduction: LossReduction = "mean",
    progress: bool = True,
    noise_generator: torch.Generator | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    ledger: LedgerClient | None = None,
) -> PrivateRun:
    """Prepare differentially private training that spends at most ``target_epsilon`` of the dataset's budget.

    Returns a :class:`~paitient.kernel.dp.private.PrivateRun`; train with its ``model``, ``optimizer``,
    ``criterion`` and ``data_loader`` (Poisson sampling: batch sizes vary and a batch may be empty).
    The options (``target_epsilon`` to ``progress``) are those of
    :class:`~paitient.kernel.dp.options.RunOptions`, checked before anything else (:class:`OptionsError`
    names each bad one). ``mode`` is ``auto`` (the fastest correct one: ``fast`` for all-Linear models,
    else ``ghost`` where every layer supports it and a ``criterion`` is given, else ``hooks``);
    ``run.mode`` and ``run.mode_reason`` say what was picked. ``target_delta`` defaults to
    :func:`paitient.rules.budget.default_delta`. ``project``/``dataset`` may be left out when you have only one.
    ``noise_generator`` seeds the sampling and the noise (for tests; leave it out to train). The ledger
    is reached over ``$PAITIENT_RUN_DIR/ledger.sock`` (or ``run_dir``, or the ``ledger`` client given);
    the dataset's version is read from its manifest under ``$PAITIENT_DATA_DIR`` (or ``data_dir``).
    """
    options = RunOptions(
        target_epsilon=target_epsilon,
        epochs=epochs,
        max_grad_norm=max_grad_norm,
        target_delta=target_delta,
        project=project,
        dataset=dataset,
        mode=mode,
        loss_reduction=loss_reduction,
        progress=progress,
    )
    return _start(
        model,
        optimizer,
        data_loader,
        options,
        criterion=criterion,
        generator=noise_generator,
        ledger=ledger,
        run_dir=run_dir,
        data_dir=data_dir,
    )


def _dataset_size(data_loader: object) -> int:
    """Rows of a map-style DataLoader's dataset; a ValueError that says what to use for anything else."""
    if not isinstance(data_loader, DataLoader):
        raise ValueError(
            f"data_loader must be a torch DataLoader, got {type(data_loader).__name__}; wrap the "
            "data in a TensorDataset and a DataLoader(dataset, batch_size=...)"
        )
    dataset = data_loader.dataset
    if isinstance(dataset, IterableDataset) or not isinstance(dataset, Sized):
        raise ValueError(
            "Poisson sampling picks rows by index: use a map-style dataset (one with len() and "
            "indexing, e.g. a TensorDataset), not an IterableDataset"
        )
    if len(data_loader) == 0:
        raise ValueError("the data loader yields no batches; check the dataset and batch_size")
    return len(dataset)


def _start(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[Any],
    options: RunOptions,
    *,
    criterion: nn.Module | None,
    generator: torch.Generator | None,
    ledger: LedgerClient | None,
    run_dir: str | os.PathLike[str] | None,
    data_dir: str | os.PathLike[str] | None,
) -> PrivateRun:
    """Check the model, plan the run, reserve its budget and make the private parts (see the module's docs)."""
    check_model(model, optimizer)
    chosen, reason, layers = choose_mode(model, optimizer, criterion, options.mode)
    n = _dataset_size(data_loader)
    steps_per_epoch = len(data_loader)
    sample_rate = 1 / steps_per_epoch
    planned_steps = options.epochs * steps_per_epoch
    ledger = ledger if ledger is not None else LedgerClient(run_dir)
    # all of the caller's projects, so a project that is not theirs gets the list of theirs (the service
    # would only say "forbidden")
    project, dataset, row = resolve_target(ledger.budget(), options.project, options.dataset)
    target_delta = options.target_delta
    if target_delta is None:
        target_delta = default_delta(row["delta_total"], n)
    with prv_quiet():
        noise_multiplier = float(
            get_noise_multiplier(
                target_epsilon=options.target_epsilon,
                target_delta=target_delta,
                sample_rate=sample_rate,
                steps=planned_steps,
                accountant="prv",
            )
        )
    plan = RunPlan(
        project=project,
        dataset=dataset,
        dataset_version=dataset_version(project, dataset, data_dir),
        target_delta=target_delta,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        planned_steps=planned_steps,
        # Opacus' int(n * q), guarded against n * (1/n) == 0.999...: the mean divides by it
        expected_batch_size=max(1, int(n * sample_rate + 1e-9)),
        dataset_size=n,
        mode=chosen,
        mode_reason=reason,
    )
    run_id = uuid.uuid4().hex[:12]
    reservation: str = ledger.reserve(project, dataset, options.target_epsilon, target_delta, run_id=run_id)[
        "reservation"
    ]
    try:
        parts = _private_parts(plan, options, layers, model, optimizer, data_loader, criterion, generator)
    except BaseException:
        ledger.settle(reservation, 0.0, {"note": "make_private failed before training"}, delta_spent=0.0)
        raise
    run = PrivateRun(options, plan, parts, ledger=ledger, reservation=reservation, run_id=run_id)
    opt = run.optimizer
    if isinstance(opt, FastDPOptimizer):
        opt.before_step, opt.after_step = run._before_step, run._after_step
    else:
        _guard_opacus_step(opt, run)
    if options.progress:  # otherwise run.mode and run.mode_reason say it
        print(
            f"paitient.kernel.dp: mode {chosen} ({reason}); noise multiplier {noise_multiplier:.4g}, "
            f"sample rate {sample_rate:.4g}, {planned_steps} steps; reserved epsilon {options.target_epsilon:g}, "
            f"delta {target_delta:.3g} of {project}/{dataset}"
        )
    return run


def _accounted_steps(accountant: Accountant) -> int:
    return sum(int(h[-1]) for h in getattr(accountant, "history", ()))


def _guard_opacus_step(opt: torch.optim.Optimizer, run: PrivateRun) -> None:
    """Make Opacus' optimizer refuse steps the run has no budget for, and count the ones it takes."""
    original = opt.step

    def step(closure: Callable[[], float] | None = None) -> float | None:
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

    # this one optimizer object only; its class (Opacus' DPOptimizer) stays as it is
    opt.step = step  # type: ignore[method-assign,assignment]  # an instance attribute shadows the method


def _private_parts(
    plan: RunPlan,
    options: RunOptions,
    layers: list[tuple[str, nn.Module]],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[Any],
    criterion: nn.Module | None,
    generator: torch.Generator | None,
) -> PrivateParts:
    if plan.mode == "fast":
        loader = poisson_loader(data_loader, generator=generator)
        if loader is None:
            from opacus.data_loader import DPDataLoader

            loader = DPDataLoader.from_data_loader(data_loader, generator=generator)
        clipper = FastClipper(model, layers)
        opt = FastDPOptimizer(
            optimizer,
            clipper,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=options.max_grad_norm,
            expected_batch_size=plan.expected_batch_size,
            loss_reduction=options.loss_reduction,
            generator=generator,
        )
        return PrivateParts(
            model=model,
            optimizer=opt,
            criterion=criterion,
            data_loader=loader,
            clipper=clipper,
            accountant=PRVAccountant(),
        )
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant="prv")
    out = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        criterion=criterion if criterion is not None else nn.CrossEntropyLoss(),
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=options.max_grad_norm,
        loss_reduction=options.loss_reduction,
        poisson_sampling=True,
        grad_sample_mode=plan.mode,
        noise_generator=generator,
    )
    if plan.mode == "ghost":
        pmodel, popt, pcrit, ploader = out
    else:
        (pmodel, popt, ploader), pcrit = out, criterion
    return PrivateParts(
        model=pmodel,
        optimizer=popt,
        criterion=pcrit,
        data_loader=ploader,
        accountant=engine.accountant,
    )


__all__ = [
    "DPModelError",
    "OptionsError",
    "PrivateRun",
    "RunFinished",
    "RunOptions",
    "RunPlan",
    "dataset_version",
    "default_delta",
    "make_private",
    "resolve_target",
]
