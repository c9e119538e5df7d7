"""DP-SGD as the runner does it: over a functional model, with parameters, sampling and noise it owns.

:func:`plan` finds the noise multiplier that reaches the target epsilon at the job's delta for its steps
(Poisson sampling at rate ``batch_size / n``, ``epochs / rate`` steps) with Opacus' accountant.
:func:`train` then, at each step: draws a Poisson sample of the rows (each row independently, so a step
may see none), takes each sampled row's gradient (``torch.func.vmap`` of ``grad`` over the functional
model, in chunks), clips each to ``max_grad_norm`` in total L2 norm, sums them, adds Gaussian noise of
standard deviation ``noise_multiplier * max_grad_norm``, divides by the expected batch size and steps the
optimiser; the accountant records every step, so the epsilon reported is what the steps taken spent.
:func:`evaluate` measures the model on held-out rows, :func:`membership_audit` attacks it there.
The loss shown while training is the mean over each step's sample, rounded: an aggregate outside the DP
guarantee, shown for following progress (``docs/security-model.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

Forward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]
ACCOUNTANTS = ("prv", "rdp")
CHUNK = 1024
"""Rows whose per-sample gradients are taken at once (memory: one gradient per row)."""
REPORT_EPSILON_EVERY = 0.05
"""The accountant's epsilon is worked out for progress reports every this share of the steps."""
BOOTSTRAP = 200


class TrainError(ValueError):
    """The job cannot be trained as asked; the message says why and what to change."""


@dataclass(frozen=True)
class TrainSpec:
    epochs: int
    batch_size: int
    lr: float
    optimizer: str
    max_grad_norm: float
    target_epsilon: float
    delta: float
    accountant: str
    loss: str
    seed: int


@dataclass(frozen=True)
class Plan:
    sample_rate: float
    steps: int
    noise_multiplier: float


@dataclass(frozen=True)
class Progress:
    step: int
    steps: int
    epsilon: float
    loss: float


@dataclass
class Result:
    params: dict[str, torch.Tensor]
    epsilon: float
    delta: float
    steps: int
    noise_multiplier: float
    sample_rate: float
    losses: list[float] = field(default_factory=list)
    """Mean sampled loss of each epoch."""


def _accountant(name: str) -> Any:
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name not in ACCOUNTANTS:
        raise TrainError(f"accountant must be one of {', '.join(ACCOUNTANTS)}")
    return PRVAccountant() if name == "prv" else RDPAccountant()


def epsilon_after(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """Epsilon spent by ``steps`` steps at ``noise_multiplier`` and ``sample_rate``, at ``delta``."""
    if steps <= 0:
        return 0.0
    acc = _accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def plan(spec: TrainSpec, n: int) -> Plan:
    """Sampling rate, steps and the noise multiplier that reaches ``spec.target_epsilon`` on ``n`` rows."""
    from opacus.accountants.utils import get_noise_multiplier

    if n < 2:
        raise TrainError(f"{n} training rows are too few to train on")
    rate = min(1.0, spec.batch_size / n)
    steps = max(1, round(spec.epochs / rate))
    try:
        sigma = get_noise_multiplier(
            target_epsilon=spec.target_epsilon,
            target_delta=spec.delta,
            sample_rate=rate,
            steps=steps,
            accountant=spec.accountant,
            epsilon_tolerance=0.01,
        )
    except ValueError as e:
        raise TrainError(
            f"epsilon {spec.target_epsilon:g} cannot be reached with {steps} steps at sampling rate {rate:.3g} "
            f"({e}); ask for a larger target_epsilon or fewer epochs"
        ) from None
    if not math.isfinite(sigma) or sigma <= 0 or sigma > 1e4:
        raise TrainError(f"no usable noise multiplier for epsilon {spec.target_epsilon:g}; ask for a larger one")
    return Plan(sample_rate=rate, steps=steps, noise_multiplier=float(sigma))


def loss_function(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The mean loss of outputs against targets (class indices for the classification losses)."""
    if name == "cross_entropy":
        return lambda out, y: F.cross_entropy(out, y.long())
    if name == "bce_with_logits":
        return lambda out, y: F.binary_cross_entropy_with_logits(out.reshape(-1), y.reshape(-1).to(out.dtype))
    if name == "mse":
        return lambda out, y: F.mse_loss(out.reshape(-1), y.reshape(-1).to(out.dtype))
    raise TrainError(f"loss {name!r} is not cross_entropy, bce_with_logits or mse")


def clipped_sum(
    per_sample: Callable[..., dict[str, torch.Tensor]],
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    max_grad_norm: float,
) -> dict[str, torch.Tensor]:
    """The sum over rows of each row's gradient clipped to ``max_grad_norm`` (total L2 norm over all parameters)."""
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for start in range(0, len(x), CHUNK):
        grads = per_sample(params, x[start : start + CHUNK], y[start : start + CHUNK])
        norms = torch.sqrt(torch.stack([(g.reshape(g.shape[0], -1) ** 2).sum(1) for g in grads.values()]).sum(0))
        factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for k, g in grads.items():
            total[k] += torch.tensordot(factor, g, dims=1)
    return total


def train(
    forward: Forward,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    spec: TrainSpec,
    *,
    on_step: Callable[[Progress], bool] | None = None,
    the_plan: Plan | None = None,
) -> Result:
    """DP-SGD from ``params`` (the runner's initial values); ``on_step`` returning False stops early."""
    from torch.func import grad, vmap

    the_plan = the_plan or plan(spec, len(x))
    loss = loss_function(spec.loss)
    gen = torch.Generator().manual_seed(int(spec.seed))
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    optimizer: torch.optim.Optimizer
    if spec.optimizer == "adam":
        optimizer = torch.optim.Adam(list(leaves.values()), lr=spec.lr)
    elif spec.optimizer == "sgd":
        optimizer = torch.optim.SGD(list(leaves.values()), lr=spec.lr)
    else:
        raise TrainError(f"optimizer {spec.optimizer!r} is not sgd or adam")

    def sample_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return loss(forward(p, xi.unsqueeze(0)), yi.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0), randomness="different")
    accountant = _accountant(spec.accountant)
    n, q, sigma, c = len(x), the_plan.sample_rate, the_plan.noise_multiplier, spec.max_grad_norm
    expected = q * n
    every = max(1, round(the_plan.steps * REPORT_EPSILON_EVERY))
    steps_per_epoch = max(1, round(1 / q))
    epoch_losses: list[float] = []
    running: list[float] = []
    epsilon = 0.0
    done = 0
    for step in range(1, the_plan.steps + 1):
        chosen = torch.nonzero(torch.rand(n, generator=gen) < q).squeeze(1)
        detached = {k: v.detach() for k, v in leaves.items()}
        if len(chosen):
            summed = clipped_sum(per_sample, detached, x[chosen], y[chosen], c)
            with torch.no_grad():
                running.append(float(loss(forward(detached, x[chosen]), y[chosen])))
        else:
            summed = {k: torch.zeros_like(v) for k, v in detached.items()}
        for k, leaf in leaves.items():
            noise = torch.normal(0.0, sigma * c, size=leaf.shape, generator=gen)
            leaf.grad = (summed[k] + noise) / expected
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        accountant.step(noise_multiplier=sigma, sample_rate=q)
        done = step
        if step % steps_per_epoch == 0 or step == the_plan.steps:
            epoch_losses.append(float(np.mean(running)) if running else float("nan"))
            running = []
        if on_step is not None:
            if step % every == 0 or step == the_plan.steps:
                epsilon = _spent(accountant, spec.delta, sigma)
            shown = epoch_losses[-1] if epoch_losses else float("nan")
            if not on_step(Progress(step, the_plan.steps, epsilon, float(f"{shown:.2g}"))):
                break
    epsilon = _spent(accountant, spec.delta, sigma) if done else 0.0
    return Result(
        params={k: v.detach().clone() for k, v in leaves.items()},
        epsilon=epsilon,
        delta=spec.delta,
        steps=done,
        noise_multiplier=sigma,
        sample_rate=q,
        losses=epoch_losses,
    )


def _spent(accountant: Any, delta: float, sigma: float) -> float:
    """The accountant's epsilon so far; without noise there is no guarantee (infinity)."""
    return float(accountant.get_epsilon(delta=delta)) if sigma > 0 else math.inf


def _per_example_losses(
    forward: Forward, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, loss: str
) -> np.ndarray:
    with torch.no_grad():
        out = forward(params, x)
        if loss == "cross_entropy":
            values = F.cross_entropy(out, y.long(), reduction="none")
        elif loss == "bce_with_logits":
            values = F.binary_cross_entropy_with_logits(out.reshape(-1), y.reshape(-1).to(out.dtype), reduction="none")
        else:
            values = (out.reshape(-1) - y.reshape(-1).to(out.dtype)) ** 2
    result: np.ndarray = values.double().numpy()
    return result


def evaluate(
    forward: Forward, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, loss: str
) -> dict[str, float]:
    """Loss on the rows; for classification also accuracy and AUROC (macro one-vs-rest for more classes)."""
    from sklearn.metrics import roc_auc_score

    out_metrics = {"loss": float(np.mean(_per_example_losses(forward, params, x, y, loss)))}
    if loss == "mse":
        return out_metrics
    with torch.no_grad():
        out = forward(params, x)
    labels = y.long().numpy()
    if loss == "bce_with_logits":
        prob = torch.sigmoid(out.reshape(-1)).numpy()
        predicted = (prob >= 0.5).astype(int)
        scores: np.ndarray = prob
    else:
        probs = torch.softmax(out, dim=1).numpy()
        predicted = probs.argmax(axis=1)
        scores = probs[:, 1] if probs.shape[1] == 2 else probs
    out_metrics["accuracy"] = float((predicted == labels).mean())
    if len(np.unique(labels)) > 1:
        try:
            kw = {} if np.ndim(scores) == 1 else {"multi_class": "ovr", "average": "macro"}
            out_metrics["auroc"] = float(roc_auc_score(labels, scores, **kw))
        except ValueError:  # a class with no held-out row
            pass
    return out_metrics


def _auc_gap(members: np.ndarray, others: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.ones(len(members)), np.zeros(len(others))]
    return abs(float(roc_auc_score(labels, np.r_[members, others])) - 0.5)


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
    """How well two attacks tell training rows from held-out rows, as |AUC - 0.5| (0: not at all).

    - ``mia_loss``: a row is a member when its loss is low (the loss-threshold attack);
    - ``mia_calibrated``: the same after subtracting, from each row's loss, the median loss of its class
      (regression: of all) among the held-out rows, so rows that are easy for any model do not count.

    Equal numbers of members and held-out rows are compared; each figure comes with a bootstrap 95%
    interval (``_low``, ``_high``). Numbers to 2 significant digits.
    """
    rng = np.random.default_rng(int(seed))
    m_loss = _per_example_losses(forward, params, x_members, y_members, loss)
    h_loss = _per_example_losses(forward, params, x_holdout, y_holdout, loss)
    k = min(len(m_loss), len(h_loss))
    pick = rng.choice(len(m_loss), size=k, replace=False)
    m_loss, m_y = m_loss[pick], y_members.numpy()[pick]
    h_y = y_holdout.numpy()
    if loss == "mse":
        m_ref, h_ref = np.full(k, np.median(h_loss)), np.full(len(h_loss), np.median(h_loss))
    else:
        medians = {c: float(np.median(h_loss[h_y == c])) for c in np.unique(h_y)}
        fallback = float(np.median(h_loss))
        m_ref = np.array([medians.get(c, fallback) for c in m_y])
        h_ref = np.array([medians[c] for c in h_y])
    attacks = {"mia_loss": (-m_loss, -h_loss), "mia_calibrated": (m_ref - m_loss, h_ref - h_loss)}
    out: dict[str, float] = {}
    for name, (mem, oth) in attacks.items():
        out[name] = _round(_auc_gap(mem, oth))
        boots = [
            _auc_gap(mem[rng.integers(0, len(mem), len(mem))], oth[rng.integers(0, len(oth), len(oth))])
            for _ in range(BOOTSTRAP)
        ]
        out[f"{name}_low"], out[f"{name}_high"] = (
            _round(float(np.percentile(boots, 2.5))),
            _round(float(np.percentile(boots, 97.5))),
        )
    return out


def _round(value: float) -> float:
    return float(f"{value:.2g}")
