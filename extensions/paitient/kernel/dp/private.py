"""The private training run :func:`paitient.kernel.dp.make_private` returns, and what it is made of.

A :class:`PrivateRun` holds three parts, each a plain object one can print and compare:

- :class:`~paitient.kernel.dp.options.RunOptions`: what the researcher asked for;
- :class:`RunPlan`: what ``make_private`` worked out from them (project, delta, noise, steps, mode);
- :class:`PrivateParts`: the private model, optimizer, criterion, data loader and accountant to train with.

The run counts the optimizer's steps, refuses the ones its reservation does not cover, and settles in
the ledger at the end of its last planned epoch, on ``finish()`` or when a ``with`` block ends.
"""

from __future__ import annotations

import contextlib
import datetime
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, overload

import torch
from torch import nn
from torch.utils.data import DataLoader

from paitient.kernel.dp.fast import FastClipper
from paitient.kernel.dp.options import ChosenMode, LossReduction, RunOptions
from paitient.kernel.dp.weights import weights_sha256
from paitient.kernel.ledger import LedgerClient, LedgerUnavailable

_T = TypeVar("_T")


class RunFinished(RuntimeError):
    """The run has settled (or used every step it reserved); start a new ``make_private`` to train more."""


class Accountant(Protocol):
    """The part of an Opacus accountant a run uses (PRV here: :class:`opacus.accountants.PRVAccountant`)."""

    history: list[tuple[float, float, int]]

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None: ...

    def get_epsilon(self, delta: float) -> float: ...


class _ProgressBar(Protocol):
    """The part of a tqdm bar a run uses."""

    def update(self, n: int = 1) -> bool | None: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None: ...

    def close(self) -> None: ...


class LossValue(Protocol):
    """What a criterion returns: something to call ``backward()`` on (a tensor, or Opacus' ghost loss)."""

    def backward(self) -> None: ...


class Criterion(Protocol):
    """A loss function of the model's output and the target (an ``nn.Module`` such as ``nn.CrossEntropyLoss()``)."""

    def __call__(self, output: torch.Tensor, target: torch.Tensor, /) -> LossValue: ...


@dataclass(frozen=True, kw_only=True)
class RunPlan:
    """What :func:`~paitient.kernel.dp.make_private` worked out for a run before it reserved the budget."""

    project: str
    """The project charged."""
    dataset: str
    """The dataset trained on."""
    dataset_version: int | None
    """Its published version (from its manifest), None when it has none."""
    target_delta: float
    """Delta reserved (the options' or the dataset's default)."""
    noise_multiplier: float
    """Sigma: the noise's standard deviation over the clipping bound, from the PRV accountant."""
    sample_rate: float
    """Each row's chance to be in a batch: ``1 / len(data_loader)``."""
    planned_steps: int
    """``epochs * len(data_loader)``: the steps the reservation covers."""
    expected_batch_size: int
    """The batch size the mean loss is divided by (rows times the sample rate)."""
    dataset_size: int
    """Rows of the data loader's dataset."""
    mode: ChosenMode
    """How gradients are clipped (``auto`` resolved)."""
    mode_reason: str
    """Why that mode."""


@dataclass(frozen=True, kw_only=True)
class PrivateParts:
    """The objects to train with, made private (Opacus' wrappers, or paitient's fast optimizer)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: Criterion | None
    """The loss (Opacus' wrapper of it in ghost mode); None when none was given and the mode needs none."""
    data_loader: DataLoader[Any]
    """A loader with Poisson sampling."""
    accountant: Accountant
    clipper: FastClipper | None = None
    """The fast path's clipper, detached when the run settles; None in Opacus' modes."""


@contextlib.contextmanager
def prv_quiet() -> Iterator[None]:
    """Hide the RDP order-range warning that PRV's domain sizing raises: the RDP bound there only sizes the
    PRV grid, the PRV epsilon stays within its error bound, and the researcher has no alphas to expand."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha", category=UserWarning)
        yield


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside an Opacus wrapper (or the model itself)."""
    inner = getattr(model, "_module", None)
    return inner if isinstance(inner, nn.Module) else model


class _RunLoader:
    """The private data loader, telling the run where epochs end (the last one settles the run)."""

    def __init__(self, run: PrivateRun, loader: DataLoader[Any]):
        self._run = run
        self._loader = loader

    def __iter__(self) -> Iterator[Any]:
        self._run._start_progress()
        yield from self._loader
        self._run._epoch_done()

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _From(Generic[_T]):
    """A read-only attribute of a run that is the same-named attribute of one of its parts
    (``model = _From[nn.Module]("parts")``: ``run.model`` is ``run.parts.model``)."""

    def __init__(self, part: str) -> None:
        self.part = part
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type) -> _From[_T]: ...

    @overload
    def __get__(self, obj: object, owner: type) -> _T: ...

    def __get__(self, obj: object | None, owner: type) -> _From[_T] | _T:
        if obj is None:
            return self
        value: _T = getattr(getattr(obj, self.part), self.name)
        return value

    def __set__(self, obj: object, value: object) -> None:
        raise AttributeError(f"{self.name} is the run's {self.part}.{self.name}: make a new run to change it")


class PrivateRun:
    """What :func:`~paitient.kernel.dp.make_private` returns. Unpacks as ``model, optimizer, criterion, data_loader``.

    ``options``, ``plan`` and ``parts`` are what it was made from; their fields are also read as the
    run's own attributes (``run.epochs``, ``run.noise_multiplier``, ``run.model``, ...).
    """

    def __init__(
        self,
        options: RunOptions,
        plan: RunPlan,
        parts: PrivateParts,
        *,
        ledger: LedgerClient,
        reservation: str,
        run_id: str,
    ):
        self.options = options
        self.plan = plan
        self.parts = parts
        self.reservation = reservation
        """The ledger's id of this run's reservation."""
        self.run_id = run_id
        self.started = _now()
        self.steps = 0
        """Optimizer steps taken (counted for the accountant)."""
        self.epochs_done = 0
        self.record: dict[str, Any] | None = None
        """The ledger's entry with the training record, once the run has settled."""
        self._ledger = ledger
        self._bar: _ProgressBar | None = None
        self._eps_shown = 0.0
        self._eps_cost = 0.0
        self.data_loader = _RunLoader(self, parts.data_loader)
        """The private data loader (Poisson sampling); the end of its last planned pass settles the run."""

    # -- what it was made from, as its own attributes ----------------------------------------------

    model = _From[nn.Module]("parts")
    optimizer = _From[torch.optim.Optimizer]("parts")
    criterion = _From[Criterion | None]("parts")
    accountant = _From[Accountant]("parts")
    target_epsilon = _From[float]("options")
    epochs = _From[int]("options")
    max_grad_norm = _From[float]("options")
    loss_reduction = _From[LossReduction]("options")
    project = _From[str]("plan")
    dataset = _From[str]("plan")
    dataset_version = _From[int | None]("plan")
    target_delta = _From[float]("plan")
    noise_multiplier = _From[float]("plan")
    sample_rate = _From[float]("plan")
    planned_steps = _From[int]("plan")
    expected_batch_size = _From[int]("plan")
    dataset_size = _From[int]("plan")
    mode = _From[ChosenMode]("plan")
    mode_reason = _From[str]("plan")

    # -- the run ------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.optimizer, self.criterion, self.data_loader))

    def __enter__(self) -> PrivateRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def __repr__(self) -> str:
        return (
            f"<PrivateRun {self.project}/{self.dataset} mode={self.mode} steps={self.steps}/{self.planned_steps} "
            f"noise_multiplier={self.noise_multiplier:.4g} target_epsilon={self.target_epsilon:g}"
            f"{' settled' if self.record else ''}>"
        )

    @property
    def finished(self) -> bool:
        """Whether the run has settled in the ledger."""
        return self.record is not None

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far (PRV accountant, at ``target_delta``)."""
        if self.steps == 0:
            return 0.0
        with prv_quiet():
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
        if self.options.progress and self._bar is None and self.record is None:
            from tqdm.auto import tqdm

            bar: _ProgressBar = tqdm(
                total=self.planned_steps,
                unit="step",
                desc=f"private training ({self.mode}) on {self.project}/{self.dataset}",
            )
            bar.set_postfix_str(f"epsilon 0 of {self.target_epsilon:g}")
            self._bar = bar

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
        """The record the ledger keeps with the settled run (privacy parameters, weights' hash, times)."""
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
            "model": type(unwrap(self.model)).__name__,
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
            self.record = entry = self._ledger.settle(
                self.reservation, record["epsilon"], record, delta_spent=record["delta"]
            )
        except LedgerUnavailable as e:
            raise LedgerUnavailable(
                f"{e}. This run ({self.steps} steps, epsilon {record['epsilon']:.4g}) is not settled yet: call "
                "run.finish() again once the ledger answers; until then its whole reservation "
                f"({self.target_epsilon:g}) counts, and for good if this kernel ends first",
                e.code,
            ) from None
        if self.parts.clipper is not None:
            self.parts.clipper.detach()
        if self._bar is not None:
            self._bar.set_postfix_str(f"epsilon {record['epsilon']:.3g} of {self.target_epsilon:g}, settled")
            self._bar.close()
        return entry
