"""DP-SGD as the runner does it: over a functional model, with parameters, sampling and noise it owns.

:func:`plan` finds the noise multiplier that reaches the target epsilon at the job's delta for its steps
(Poisson sampling at rate ``batch_size / n``, ``epochs / rate`` steps) with Opacus' accountant.
:func:`train` then, at each step: draws a Poisson sample of the rows (each row independently, so a step
may see none), takes the sum of the sampled rows' gradients each clipped to ``max_grad_norm`` in total L2
norm (:mod:`paitient.services.jobs.persample`: book-keeping where the graph allows it, ``vmap`` of
``grad`` otherwise, the same sum either way), adds Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm``, divides by the expected batch size and steps the optimiser; the
accountant records every step, so the epsilon reported is what the steps taken spent.
On CUDA the step runs over the sample padded to a fixed number of rows (padding rows weighted 0) and is
captured as a CUDA graph after a few eager steps (:mod:`paitient.services.jobs.padded`): the same result to
float rounding, in one launch instead of dozens.
:func:`evaluate` measures the model on held-out rows, :func:`membership_audit` attacks it there.
The loss shown while training is the mean over each epoch's sampled rows, rounded: an aggregate outside
the DP guarantee, shown for following progress (``docs/security-model.md``).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from paitient.rules import membership
from paitient.rules.jobspec import LOSSES, MAX_ACCOUNTING_POINTS, OPTIMIZERS, SpecError, check_steps
from paitient.services.jobs.padded import PaddedStep, Stepper, capacity
from paitient.services.jobs.persample import (
    FastClipper,
    Forward,
    SampleLosses,
    Unsupported,
    exact_clipped_sum,
    fast_path_agrees,
)

ACCOUNTANTS = ("prv", "rdp")
CLIPPING = ("auto", "exact")
DEVICES = ("auto", "cpu", "cuda")
STEPS = ("auto", "eager", "padded", "graph")
"""How each step runs: ``eager`` on the sample as drawn; ``padded`` on the sample padded to a fixed number of
rows; ``graph`` padded and captured as a CUDA graph (CUDA only); ``auto`` is ``graph`` on CUDA, ``eager`` on
the CPU."""
BOOTSTRAP = 200
AUDIT_ROWS = 20_000
"""At most this many members and as many held-out rows are attacked (a seeded sample of each)."""


class TrainError(ValueError):
    """The job cannot be trained as asked; the message says why and what to change."""


def _whole(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TrainError(f"{name} must be a whole number of at least {low}; got {value!r:.40}")


def _positive(name: str, value: Any, high: float = math.inf) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0 < value < high:
        bound = "" if high == math.inf else f" and below {high:g}"
        raise TrainError(f"{name} must be a number above 0{bound}; got {value!r:.40}")


@dataclass(frozen=True)
class TrainSpec:
    """What one training run does. Checked when made: :class:`TrainError` names the field that is wrong."""

    epochs: int
    batch_size: int
    """The expected batch size: each row is in a step's sample with probability ``batch_size / n``."""
    lr: float
    optimizer: str
    """``sgd`` or ``adam``."""
    max_grad_norm: float
    """Each row's gradient is clipped to this total L2 norm."""
    target_epsilon: float
    delta: float
    accountant: str
    """``prv`` (Opacus' PRV accountant, the tighter) or ``rdp``."""
    loss: str
    """``cross_entropy`` (targets are class indices), ``bce_with_logits`` or ``smooth_hinge`` (0/1 targets,
    one output) or ``mse``."""
    seed: int
    """Seeds the sampling, the noise and the membership audit's resampling."""
    momentum: float = 0.0
    """Heavy-ball momentum of ``sgd`` (0: none); ``adam`` takes none."""

    def __post_init__(self) -> None:
        _whole("epochs", self.epochs, 1)
        _whole("batch_size", self.batch_size, 1)
        _positive("lr", self.lr)
        _positive("max_grad_norm", self.max_grad_norm)
        _positive("target_epsilon", self.target_epsilon)
        _positive("delta", self.delta, 1.0)
        _whole("seed", self.seed, 0)
        ok = isinstance(self.momentum, int | float) and not isinstance(self.momentum, bool)
        if not ok or not 0 <= self.momentum < 1:
            raise TrainError(f"momentum must be a number from 0 to below 1; got {self.momentum!r:.40}")
        if self.momentum and self.optimizer != "sgd":
            raise TrainError(f"momentum is sgd's; {self.optimizer} takes none (leave momentum at 0)")
        for name, value, allowed in (
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("accountant", self.accountant, ACCOUNTANTS),
            ("loss", self.loss, LOSSES),
        ):
            if value not in allowed:
                raise TrainError(f"{name} must be one of {', '.join(allowed)}; got {value!r:.40}")


@dataclass(frozen=True)
class Plan:
    sample_rate: float
    steps: int
    noise_multiplier: float


class Progress:
    """Where a run is after a step. ``epsilon`` is worked out when first read (the accountant takes tens of
    milliseconds, a step may take one), so a caller that reports now and then pays for what it reports."""

    __slots__ = ("step", "steps", "loss", "_epsilon", "_spent")

    def __init__(
        self,
        step: int,
        steps: int,
        epsilon: float | None = None,
        loss: float = math.nan,
        *,
        spent: Callable[[int], float] | None = None,
    ):
        self.step = step
        self.steps = steps
        self.loss = loss
        """Mean loss of the last finished epoch's sampled rows, 2 significant digits (NaN before the first)."""
        self._epsilon = epsilon
        self._spent = spent

    @property
    def epsilon(self) -> float:
        """Spent by the steps so far, at the run's delta, as the run's accountant has it."""
        if self._epsilon is None:
            self._epsilon = self._spent(self.step) if self._spent is not None else math.nan
        return self._epsilon

    def __repr__(self) -> str:
        return f"Progress(step={self.step}, steps={self.steps}, epsilon={self.epsilon:.4g}, loss={self.loss})"


@dataclass
class Result:
    params: dict[str, torch.Tensor]
    epsilon: float
    delta: float
    steps: int
    noise_multiplier: float
    sample_rate: float
    losses: list[float] = field(default_factory=list)
    """Mean loss of each epoch's sampled rows (epoch k ends after step ``round(k / sample_rate)``)."""
    clipping: str = "exact"
    """How the clipped sums were computed: ``fast`` (one pass of the batch) or ``exact`` (a gradient per row)."""
    device: str = "cpu"
    """Where the run trained: ``cpu`` or ``cuda``."""
    graph: bool = False
    """Whether the steps ran as a captured CUDA graph (all but the first few and any that overflowed)."""
    capacity: int = 0
    """Rows of a padded step (0: the steps were not padded)."""
    overflow: int = 0
    """Padded run's steps whose sample was larger than the capacity and ran unpadded."""
    graph_failed: str = ""
    """Why the step could not be captured, when it could not (the run went on unpadded and eager)."""


def _accountant(name: str) -> Any:
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name not in ACCOUNTANTS:
        raise TrainError(f"accountant must be one of {', '.join(ACCOUNTANTS)}")
    return PRVAccountant() if name == "prv" else RDPAccountant()


MAX_SIGMA = 1e6
"""The most noise :func:`plan` tries before it says no noise reaches the target (Opacus' bound)."""


CAPPED_PRECISION = 0.01
"""Where the accounting bound stops :func:`plan`'s bisection short of the target, it stops once the noise is
within this share of the least it can account for (rather than halving towards that edge for ever)."""


def prv_points(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> int:
    """The points Opacus' PRV accountant discretises over for ``steps`` steps at ``noise_multiplier`` and
    ``sample_rate`` at ``delta`` (its domain and mesh, worked out as it does from the RDP accountant: cheap)."""
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

    from paitient.rules.jobspec import ACCOUNTANT_EPS_ERROR

    delta_error = delta / 1000  # Opacus' default
    half_width = compute_safe_domain_size(
        prvs=[PoissonSubsampledGaussianPRV(sample_rate, noise_multiplier)],
        max_self_compositions=[steps],
        eps_error=ACCOUNTANT_EPS_ERROR,
        delta_error=delta_error,
    )
    mesh = ACCOUNTANT_EPS_ERROR / math.sqrt(steps * math.log(12 / delta_error) / 2)
    return int(2 * half_width / mesh) + 2


def _affordable(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> bool:
    """Whether the accountant's work for these steps is within :data:`~paitient.rules.jobspec.MAX_ACCOUNTING_POINTS`
    (the RDP accountant's is a few dozen orders, always)."""
    if accountant != "prv":
        return True
    return prv_points(noise_multiplier, sample_rate, steps, delta) <= MAX_ACCOUNTING_POINTS


def epsilon_after(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """Epsilon spent by ``steps`` steps at ``noise_multiplier`` and ``sample_rate``, at ``delta``. A PRV
    discretisation larger than :data:`~paitient.rules.jobspec.MAX_ACCOUNTING_POINTS` is refused
    (:class:`TrainError`) before it is allocated."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    if not _affordable(noise_multiplier, sample_rate, steps, delta, accountant):
        raise TrainError(
            f"the {accountant} accountant cannot account for {steps} steps at noise {noise_multiplier:.4g} within "
            f"{MAX_ACCOUNTING_POINTS} points; ask for fewer epochs or a larger batch_size"
        )
    acc = _accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


PLANNING = threading.Lock()
"""Held while :func:`plan` runs the accountant: the runner's workers plan one at a time, so the memory the
accounting bound allows is the runner's at most, not once per worker."""


def plan(spec: TrainSpec, n: int) -> Plan:
    """Sampling rate, steps and the noise multiplier that reaches ``spec.target_epsilon`` on ``n`` rows.

    The steps must be within :func:`paitient.rules.jobspec.check_steps` (checked at submission on the
    catalogue's row count, again here on the training rows, before the accountant runs). The multiplier is
    Opacus' bisection (``get_noise_multiplier``: doubling from 20, then halving the interval), the smallest it
    finds with the accountant at or below the target (to within 0.5% of it), except that a noise whose
    accounting would take more than :data:`~paitient.rules.jobspec.MAX_ACCOUNTING_POINTS` is not evaluated
    and counts as too little (more noise is always allowed: it only spends less); a target no noise reaches
    within that bound is refused with what to change.
    """
    if n < 1:
        raise TrainError("there are no training rows")
    if spec.batch_size > n:
        raise TrainError(f"batch_size {spec.batch_size} is more than the {n} training rows; ask for at most {n}")
    rate = spec.batch_size / n
    steps = max(1, round(spec.epochs / rate))
    try:
        check_steps({"epochs": spec.epochs, "batch_size": spec.batch_size, "target_epsilon": spec.target_epsilon}, n)
    except SpecError as e:
        raise TrainError(str(e)) from None
    with PLANNING:  # one plan at a time in the process: the bound above is then the runner's, not each worker's
        sigma = _bisect(spec, rate, steps)
    return Plan(sample_rate=rate, steps=steps, noise_multiplier=sigma)


def _bisect(spec: TrainSpec, rate: float, steps: int) -> float:
    """:func:`plan`'s noise multiplier (Opacus' bisection, within the accounting bound)."""
    target, tolerance = spec.target_epsilon, 0.005 * spec.target_epsilon
    capped = False

    def epsilon(sigma: float) -> float:
        """The accountant's epsilon at ``sigma``; infinity where accounting it would be beyond the bound."""
        nonlocal capped
        if not _affordable(sigma, rate, steps, spec.delta, spec.accountant):
            capped = True
            return math.inf
        acc = _accountant(spec.accountant)
        acc.history = [(sigma, rate, steps)]
        return float(acc.get_epsilon(delta=spec.delta))

    def unreachable(why: str) -> TrainError:
        return TrainError(
            f"epsilon {spec.target_epsilon:g} at delta {spec.delta:g} cannot be reached by the {spec.accountant} "
            f"accountant with {steps} steps at sampling rate {rate:.3g}{why}; ask for a larger target_epsilon, "
            "fewer epochs or a smaller batch_size" + (", or use the prv accountant" if spec.accountant == "rdp" else "")
        )

    try:
        low, high, high_epsilon = 0.0, 10.0, math.inf
        while high_epsilon > target:
            high *= 2
            high_epsilon = epsilon(high)
            if high > MAX_SIGMA:
                raise unreachable(", whatever the noise (The privacy budget is too low.)")
        while target - high_epsilon > tolerance and not (capped and high - low <= CAPPED_PRECISION * high):
            # (the second: the bound stops the bisection short of the target, within 1% of the least noise it
            # can account for; that noise spends less than the target)
            sigma = (low + high) / 2
            at = epsilon(sigma)
            if at < target:
                high, high_epsilon = sigma, at
            else:
                low = sigma
    except TrainError:
        raise
    except (ValueError, ArithmeticError) as e:
        raise unreachable(f", whatever the noise ({e})") from None
    if not math.isfinite(high) or high <= 0:
        raise TrainError(f"no usable noise multiplier for epsilon {spec.target_epsilon:g}; ask for a larger one")
    return float(high)


def pick_device(name: str) -> torch.device:
    """The device a run trains on: ``auto`` is CUDA when torch sees a GPU, the CPU otherwise."""
    if name not in DEVICES:
        raise TrainError(f"device must be one of {', '.join(DEVICES)}; got {name!r:.40}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("device cuda was asked for, but torch sees no GPU here; use auto or cpu")
    return torch.device(name)


def step_mode(name: str, device: torch.device) -> str:
    """How a run's steps run on ``device`` (:data:`STEPS`): ``auto`` is ``graph`` on CUDA, ``eager`` elsewhere."""
    if name not in STEPS:
        raise TrainError(f"step must be one of {', '.join(STEPS)}; got {name!r:.40}")
    if name == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if name == "graph" and device.type != "cuda":
        raise TrainError("step graph captures a CUDA graph: it needs device cuda")
    return name


def sample_losses(name: str) -> SampleLosses:
    """Each row's loss (outputs and targets of B rows -> B losses); a row with several outputs averages them.

    ``cross_entropy`` takes class indices, ``bce_with_logits`` and ``smooth_hinge`` 0/1 targets, ``mse``
    numbers. ``smooth_hinge`` is the hinge loss of a margin classifier with its corner rounded off: of the
    margin m = (2y - 1) * output, 0 from m = 1 up, (1 - m)^2 / 2 between 0 and 1, 1/2 - m below 0. A row's
    gradient keeps its full size while the row is on the wrong side, however well the others fit, which under
    DP-SGD's clipping and noise can keep a linear model closer to its non-private accuracy than the logistic
    loss, whose rows' gradients fade as the fit improves (``docs/jobs.md``).
    """

    def rows(t: torch.Tensor, n: int) -> torch.Tensor:
        return t.reshape(n, -1)

    if name == "cross_entropy":
        return lambda out, y: rows(F.cross_entropy(out, y.long(), reduction="none"), len(out)).mean(1)
    if name == "bce_with_logits":
        return lambda out, y: F.binary_cross_entropy_with_logits(
            rows(out, len(out)), rows(y, len(out)).to(out.dtype), reduction="none"
        ).mean(1)
    if name == "smooth_hinge":

        def smooth_hinge(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            margin = rows(out, len(out)) * (2 * rows(y, len(out)).to(out.dtype) - 1)
            short = (1 - margin).clamp(min=0)
            return torch.where(margin > 0, 0.5 * short.square(), 0.5 - margin).mean(1)

        return smooth_hinge
    if name == "mse":
        return lambda out, y: (rows(out, len(out)) - rows(y, len(out)).to(out.dtype)).square().mean(1)
    raise TrainError(f"loss {name!r} is not one of {', '.join(LOSSES)}")


def loss_function(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The mean over rows of :func:`sample_losses` (what plain, non-private training minimises)."""
    each = sample_losses(name)
    return lambda out, y: each(out, y).mean()


def poisson_rows(n: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """The rows of one Poisson sample: each of ``0 .. n-1`` independently with probability ``rate``.

    Drawn as the gaps between chosen rows, which are geometric (``P(gap = k) = (1 - rate)^(k - 1) rate``,
    from ``floor(log(U) / log(1 - rate)) + 1`` with ``U`` uniform in (0, 1]): the same distribution as a
    coin per row, for work in proportion to the sample rather than to ``n``.
    """
    if rate >= 1:
        return torch.arange(n)
    if rate <= 0 or n <= 0:
        return torch.zeros(0, dtype=torch.long)
    log_keep = math.log1p(-rate)
    draw = int(n * rate + 6 * math.sqrt(n * rate) + 16)
    parts: list[torch.Tensor] = []
    last = -1
    while True:
        u = 1.0 - torch.rand(draw, dtype=torch.float64, generator=generator)  # in (0, 1]
        gaps = torch.floor(torch.log(u) / log_keep).clamp_(max=float(n)).long() + 1
        at = last + torch.cumsum(gaps, 0)
        inside = at[at < n]
        parts.append(inside)
        if len(inside) < len(at):
            return torch.cat(parts)
        last = int(at[-1])


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """No TF32 in matrix products and convolutions while a run trains on a GPU (cuDNN allows it for
    convolutions by default): a row's clipped gradient is then computed, and its norm bounded, to float32
    rounding rather than to TF32's 10-bit mantissa, the same on either way of clipping."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@full_precision()
def train(
    forward: Forward,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    spec: TrainSpec,
    *,
    on_step: Callable[[Progress], bool | None] | None = None,
    the_plan: Plan | None = None,
    clipping: str = "auto",
    device: str = "auto",
    step: str = "auto",
) -> Result:
    """DP-SGD from ``params`` (the runner's initial values) on rows ``x`` with targets ``y``.

    ``forward(params, x)`` must be a pure function of its arguments. ``on_step`` is called after every
    step; returning False stops the run there (the steps taken are what the result's epsilon counts).
    ``the_plan`` replaces :func:`plan`'s (the runner passes the one it reserved budget for).
    ``clipping``: ``auto`` takes the fast way when it agrees with the exact one on a probe batch
    (:func:`paitient.services.jobs.persample.fast_path_agrees`), ``exact`` always a gradient per row.
    ``device`` (:func:`pick_device`): where the parameters, the rows and the noise live; the Poisson
    sampling draws on the CPU either way, and the result's parameters come back on the CPU.
    ``step`` (:data:`STEPS`, :func:`step_mode`): eager, padded, or padded and captured as a CUDA graph.
    """
    if clipping not in CLIPPING:
        raise TrainError(f"clipping must be one of {', '.join(CLIPPING)}")
    if len(x) != len(y):
        raise TrainError(f"{len(x)} rows but {len(y)} targets")
    the_plan = the_plan or plan(spec, len(x))
    losses_of = sample_losses(spec.loss)
    on = pick_device(device)
    mode = step_mode(step, on)
    gen = torch.Generator().manual_seed(int(spec.seed))
    # the noise: from the sampling's generator on the CPU; on a GPU from one of its own, seeded the same
    noise_gen = gen if on.type == "cpu" else torch.Generator(device=on).manual_seed(int(spec.seed))
    x, y = x.to(on), y.to(on)
    leaves = {k: v.detach().to(on).clone().requires_grad_(True) for k, v in params.items()}
    optimizer: torch.optim.Optimizer
    if spec.optimizer == "adam":  # a padded step on CUDA may be captured: Adam's step count then lives there
        capturable = on.type == "cuda" and mode != "eager"
        optimizer = torch.optim.Adam(list(leaves.values()), lr=spec.lr, capturable=capturable)
    else:
        optimizer = torch.optim.SGD(list(leaves.values()), lr=spec.lr, momentum=spec.momentum)
    clipper = FastClipper(forward, losses_of)
    fast: FastClipper | None = None
    if clipping == "auto" and fast_path_agrees(clipper, leaves, x, y, seed=spec.seed, loss=spec.loss):
        fast = clipper

    n, q, sigma, c = len(x), the_plan.sample_rate, the_plan.noise_multiplier, spec.max_grad_norm
    expected = q * n
    accountant = _accountant(spec.accountant) if sigma > 0 else None  # no noise: no guarantee to account for
    names = list(leaves)
    sizes = [leaves[k].numel() for k in names]
    noise = torch.empty(sum(sizes), dtype=leaves[names[0]].dtype, device=on) if names else torch.empty(0, device=on)

    def spent_after(steps: int) -> float:
        return epsilon_after(sigma, q, steps, spec.delta, spec.accountant)

    epoch = 1  # epoch k ends after step round(k / q), the last with the last step
    epoch_losses: list[float] = []
    # the sampled rows' losses add up where they are computed: reading them back each step would make a GPU
    # wait for every step; they are read once an epoch
    loss_sum, loss_rows = torch.zeros((), dtype=torch.float64, device=on), 0
    done = 0
    views = {k: part.view(leaves[k].shape) for k, part in zip(names, torch.split(noise, sizes), strict=True)}
    padded: PaddedStep | None = None

    def eager(rows: torch.Tensor) -> None:
        """One step on the sample as drawn."""
        nonlocal fast
        if padded is not None:
            fast = padded.fast
        if on.type == "cuda":  # from pinned memory, without waiting for the steps queued before it
            rows = rows.pin_memory().to(on, non_blocking=True)
        # the noise first, N(0, (sigma C / E)^2), then the clipped sum / E added into it: one buffer, no extra pass
        if sigma > 0:
            noise.normal_(0.0, sigma * c / expected, generator=noise_gen)
        else:
            noise.zero_()
        if len(rows):
            xb, yb = x[rows], y[rows]
            losses: torch.Tensor | None = None
            if fast is not None:
                try:
                    _, _, losses = fast.clipped_sum(leaves, xb, yb, c, scale=1 / expected, into=views)
                except Unsupported:  # refused before adding anything: this step the exact way, and the next ones
                    fast = None
            if losses is None:
                _, _, losses = exact_clipped_sum(forward, losses_of, leaves, xb, yb, c, scale=1 / expected, into=views)
            loss_sum.add_(losses.detach().sum().double())
        if padded is not None and fast is None:
            padded.fast = None
        for k, leaf in leaves.items():
            leaf.grad = views[k]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    stepper: Stepper | None = None
    if mode != "eager":
        padded = PaddedStep(
            forward, losses_of, leaves, optimizer, x, y, capacity=capacity(n, q), max_grad_norm=c, scale=1 / expected,
            noise_std=sigma * c / expected if sigma > 0 else 0.0, noise=noise, views=views, noise_gen=noise_gen,
            loss_sum=loss_sum, fast=fast,
        )  # fmt: skip
        stepper = Stepper(padded, eager, capture=mode == "graph", generators=(noise_gen,))
    run_step = stepper or eager
    for at in range(1, the_plan.steps + 1):
        rows = poisson_rows(n, q, gen)
        run_step(rows)
        loss_rows += len(rows)
        if accountant is not None:
            accountant.step(noise_multiplier=sigma, sample_rate=q)
        done = at
        if at >= round(epoch / q) or at == the_plan.steps:
            epoch_losses.append(float(loss_sum) / loss_rows if loss_rows else math.nan)
            loss_sum.zero_()
            loss_rows, epoch = 0, epoch + 1
        if on_step is not None:
            shown = float(f"{epoch_losses[-1]:.2g}") if epoch_losses else math.nan
            if on_step(Progress(at, the_plan.steps, loss=shown, spent=spent_after)) is False:
                break
    if loss_rows:
        epoch_losses.append(float(loss_sum) / loss_rows)  # stopped inside an epoch: its part so far
    epsilon = _spent(accountant, spec.delta, sigma) if done else 0.0
    if padded is not None and padded.fast is None:
        fast = None  # (a graph captured on the fast way keeps it; both ways give the same sum)
    used = "fast" if fast is not None else "exact"
    return Result(
        params={k: v.detach().cpu().clone() for k, v in leaves.items()},
        epsilon=epsilon,
        delta=spec.delta,
        steps=done,
        noise_multiplier=sigma,
        sample_rate=q,
        losses=epoch_losses,
        clipping=used,
        device=on.type,
        graph=stepper is not None and stepper.captured,
        capacity=padded.capacity if padded is not None else 0,
        overflow=stepper.overflow if stepper is not None else 0,
        graph_failed=stepper.failed if stepper is not None else "",
    )


def _spent(accountant: Any, delta: float, sigma: float) -> float:
    """The accountant's epsilon so far; without noise there is no guarantee (infinity)."""
    return float(accountant.get_epsilon(delta=delta)) if sigma > 0 and accountant is not None else math.inf


EACH_ROW_CHUNK = 1024
"""Rows one ``vmap`` of :func:`row_by_row` computes at once."""


def row_by_row(forward: Forward) -> Forward:
    """``forward`` computed for each row alone, a batch of one row, as the exact way of clipping trains a graph
    in which a row's output reads other rows (``vmap`` over the rows, in chunks). Such a graph can tell one
    row from many (the spread of the batch is 0 only for one row): evaluated and audited with every row in
    one call, it computed another function than the one trained, and a graph that memorised its rows showed
    a coin's membership numbers."""
    from torch.func import vmap

    def each(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if len(x) == 0:
            return forward(params, x)
        one = vmap(lambda xi: forward(params, xi.unsqueeze(0)).squeeze(0), randomness="different")
        return torch.cat([one(x[start : start + EACH_ROW_CHUNK]) for start in range(0, len(x), EACH_ROW_CHUNK)])

    return each


def audited_ways(
    evaluated: Forward, trained: Forward, *, dropout: bool, rows_independent: bool
) -> tuple[Forward, list[Forward]]:
    """The function of the weights the held-out metrics are computed with, and those the membership audit
    reads (:func:`worst_membership_audit`), of a graph computed as ``evaluated`` (dropout off) and as
    ``trained`` (on). Dropout on and off make two functions of one set of weights, and so do one row and many
    where a row's output reads the others' (:func:`row_by_row`): each is audited. Such a graph was trained one
    row at a time, and its metrics are computed so."""
    ways = [evaluated, trained] if dropout else [evaluated]
    if rows_independent:
        return evaluated, ways
    return row_by_row(evaluated), [*(row_by_row(way) for way in ways), *ways]


def _outputs(forward: Forward, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return forward({k: v.detach() for k, v in params.items()}, x)


def evaluate(
    forward: Forward, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, loss: str
) -> dict[str, float]:
    """``loss`` (the mean over the rows); for classification also ``accuracy`` and ``auroc``.

    AUROC for two classes is of the positive class's probability (the sigmoid of the logit for
    ``bce_with_logits``, the softmax's second column for ``cross_entropy``) or score (the output for
    ``smooth_hinge``, positive for the positive class); for more classes the macro average of one-vs-rest
    AUROCs. It is left out when the rows hold a single class.
    """
    from sklearn.metrics import roc_auc_score

    out = _outputs(forward, params, x)
    metrics = {"loss": float(sample_losses(loss)(out, y).double().mean())}
    if loss == "mse":
        return metrics
    out, y = out.cpu(), y.cpu()
    labels = y.reshape(-1).long().numpy()
    if loss == "bce_with_logits":
        prob = torch.sigmoid(out.reshape(-1).double()).numpy()
        predicted = (prob >= 0.5).astype(np.int64)
        scores: np.ndarray = prob
    elif loss == "smooth_hinge":
        scores = out.reshape(-1).double().numpy()
        predicted = (scores > 0).astype(np.int64)
    else:
        probs = torch.softmax(out.double(), dim=1).numpy()
        predicted = probs.argmax(axis=1)
        scores = probs[:, 1] if probs.shape[1] == 2 else probs
    metrics["accuracy"] = float((predicted == labels).mean())
    present = np.unique(labels)
    if len(present) > 1:
        if np.ndim(scores) == 1:
            metrics["auroc"] = float(roc_auc_score(labels, scores))
        elif len(present) == scores.shape[1]:
            metrics["auroc"] = float(roc_auc_score(labels, scores, multi_class="ovr", average="macro"))
        else:  # some class has no row here: the macro average over the classes that do
            per_class = [float(roc_auc_score(labels == k, scores[:, k])) for k in present]
            metrics["auroc"] = float(np.mean(per_class))
    return metrics


def membership_audit(
    forward: Forward,
    params: dict[str, torch.Tensor],
    x_members: torch.Tensor,
    y_members: torch.Tensor,
    x_holdout: torch.Tensor,
    y_holdout: torch.Tensor,
    loss: str,
    seed: int,
) -> dict[str, float]:
    """How well two attacks tell training rows (members) from held-out rows, as ``|AUC - 0.5|``.

    - ``mia_loss``: the loss-threshold attack: a row is a member when its loss is low;
    - ``mia_calibrated``: the same on each row's loss minus the median held-out loss of its class (for
      ``mse``, of the held-out rows whose target falls in the same quintile), so rows that are easy or hard
      for any model stop counting as evidence of membership. It trains nothing: the reference is the
      held-out rows the runner kept back.

    Each comes with a seeded percentile-bootstrap 95% interval (``_low``, ``_high``; 200 resamples of the
    members and of the held-out rows). The statistics are :mod:`paitient.rules.membership`'s, which the
    airlock's audit uses too. All numbers lie in [0, 0.5] and have 2 significant digits; 0 means the
    attack does no better than a coin.
    """
    rng = np.random.default_rng(int(seed))
    if len(x_members) == 0 or len(x_holdout) == 0:
        raise TrainError("the membership audit needs members and held-out rows")
    pick_m = _sample(len(x_members), rng)
    pick_h = _sample(len(x_holdout), rng)
    each = sample_losses(loss)
    ym, yh = y_members[pick_m], y_holdout[pick_h]
    m_loss = each(_outputs(forward, params, x_members[pick_m]), ym).double().cpu().numpy()
    h_loss = each(_outputs(forward, params, x_holdout[pick_h]), yh).double().cpu().numpy()
    return membership.attack_numbers(
        m_loss, h_loss, _keys(ym), _keys(yh), classes=loss != "mse", seed=int(seed), resamples=BOOTSTRAP
    )


def worst_membership_audit(
    forwards: Sequence[Forward],
    params: dict[str, torch.Tensor],
    x_members: torch.Tensor,
    y_members: torch.Tensor,
    x_holdout: torch.Tensor,
    y_holdout: torch.Tensor,
    loss: str,
    seed: int,
) -> dict[str, float]:
    """:func:`membership_audit` of each way of computing the model from the same weights (with dropout off,
    and as trained, with it on), each attack's numbers from the way it does best on. A graph can compute
    anything from dropout's switch (``d * (2 - d)`` of a dropout of ones is 0 while training, 1 without):
    audited only with dropout off, weights trained as a classifier could show a constant and pass."""
    audits = []
    for forward in forwards:
        torch.manual_seed(int(seed))  # dropout's draws, where it is on
        audits.append(membership_audit(forward, params, x_members, y_members, x_holdout, y_holdout, loss, seed))
    out: dict[str, float] = {}
    for attack in ("mia_loss", "mia_calibrated"):
        worst = max(audits, key=lambda audit: audit[attack])
        out.update({k: v for k, v in worst.items() if k == attack or k.startswith(attack + "_")})
    return out


def _sample(n: int, rng: np.random.Generator) -> torch.Tensor:
    if n <= AUDIT_ROWS:
        return torch.arange(n)
    return torch.from_numpy(np.sort(rng.choice(n, size=AUDIT_ROWS, replace=False)))


def _keys(y: torch.Tensor) -> np.ndarray:
    """One key per row for calibration: the class, or (several targets) the first."""
    flat = y.reshape(len(y), -1)[:, 0] if y.dim() > 1 else y
    keys: np.ndarray = flat.double().cpu().numpy()
    return keys
