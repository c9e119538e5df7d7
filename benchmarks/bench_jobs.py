"""Certified training: the runner's DP-SGD against plain SGD of the same model, its utility, and submit to first step.

    /opt/paitient/venv/bin/python benchmarks/bench_jobs.py [--steps 20] [--blocks 7] [--threads 2] [--clock wall]
        [--models MLP,CNN,CNN2] [--exact] [--seeds 5] [--splits 1] [--sweep] [--objective] [--device cpu|cuda]
        [--batch 512] [--graph both|on|off] [--fresh 8:48] [--skip agree,throughput,utility,runner]

Throughput: the runner's training step (:func:`paitient.services.jobs.train.train`: Poisson sampling, the
clipped per-sample sum, book-keeping where the graph allows it, noise, accountant) against plain SGD of the
same exported graph (a shuffled order cut into batches, mean loss, backward, step), batch ``--batch``, in
alternating blocks of ``--steps`` steps (``--blocks`` rounds, the order rotating, so drifting load falls on
each). A DP block is timed from its first step's end to its last's (the one-off probe that picks the
clipping way is reported apart as set-up); with the step captured as a CUDA graph, from the end of the step
that captured it, after the warm-up steps. The figure is the median over the rounds of plain SGD's rate
over DP-SGD's, and its inverse as DP-SGD's share of plain SGD's throughput. On a machine other work
shares, ``--threads 1 --clock cpu`` (the thread's CPU time) is the steadier measure. ``--device cuda`` runs
both on the GPU (timed after the GPU's queue is drained) and first shows that one noiseless step on the GPU
gives the parameters the CPU gives (``--skip agree`` leaves that out); DP-SGD is timed with its step
captured as a CUDA graph and eager, in the same rounds (``--graph both``, the default; ``on`` or ``off``
for one). Models: the MLP of bench_dp.py (64-256-256-2, 200k x 64 rows), a small CNN on 28x28 inputs
(conv 1->8, 3x3, max-pool, linear to 10 classes; 60k rows) and a deeper one (CNN2: conv 1->16 and 16->32,
3x3, two linear layers). ``--exact``
also times the exact way (a gradient per row, vmap).

Utility: scikit-learn's breast_cancer, a fixed 80/20 split (permutation seed 0; 455 training rows, 114 held
out), standardised with the training rows' statistics; logistic regression (Linear(30, 2)), the issue's
example MLP (30-16-2) and a wider one (30-256-256-2) under cross-entropy, trained through ``train`` at
epsilon 1, delta 1e-5 (PRV accountant), the median held-out accuracy of ``--seeds`` seeds, against
scikit-learn's LogisticRegression (L2, C = 1) and against the same trainer without privacy (the same
sampling, steps and optimiser; no clipping, no noise). Each model's setting (:data:`UTILITY`) is the best
found on that split; ``--splits K`` also runs each on K - 1 further splits (permutation seeds 1 to K - 1)
and prints DP's distance from the same trainer on every split, for how far the first split's figure
generalises. ``--sweep`` also tries the logistic regression under each of :data:`SWEEP`'s settings (optimiser,
batch size, learning rate, clipping bound, epochs) and prints the best medians; ``--objective`` trains it
by objective perturbation instead, a mechanism made for convex models: with pure epsilon
(:func:`objective_perturbation`) and with Gaussian noise (:func:`gaussian_objective_perturbation`).
Then the margin classifier (:class:`MarginModel`, :data:`MARGIN`: the ten ``worst`` columns, the smooth hinge
loss, sgd with momentum, full batches, from zeros) on split 0 and on the fresh splits ``--fresh`` (by
default 8 to 47, none of which chose its setting), against scikit-learn's logistic regression on all 30
columns: the issue's goal for a linear model, met on average by the median of five runs.

Submit to first step: the runner for real (ledger on its socket, the worker in the sandbox as a fresh
account), from submit until the first progress report; needs root.

Goals (issue 13): <= 1.5x plain SGD on the MLP, <= 2x on the CNN; logistic regression within 0.5 points of
the non-private accuracy, the MLP within 1 point; submit to first step <= 5 s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "extensions"))

from paitient.kernel.jobs.export import export_graph  # noqa: E402
from paitient.services.jobs.graph import initialise, load_graph  # noqa: E402
from paitient.services.jobs.padded import WARMUP  # noqa: E402
from paitient.services.jobs.train import Plan, TrainSpec, evaluate, loss_function, plan, train  # noqa: E402
from tests.groups import made_groups_removed  # noqa: E402

BATCH = 512


def models() -> dict[str, tuple[nn.Module, tuple[int, ...], int, int]]:
    """name -> (model, one row's shape, classes, rows)."""
    mlp = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2))
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 13 * 13, 10))
    cnn2 = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 6 * 6, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    return {
        "MLP": (mlp, (64,), 2, 200_000),
        "CNN": (cnn, (1, 28, 28), 10, 60_000),
        "CNN2": (cnn2, (1, 28, 28), 10, 60_000),
    }


def functional(model: nn.Module, row: tuple[int, ...]) -> tuple[Any, Callable[..., torch.Tensor]]:
    """The model as the runner sees it: exported, checked, loaded; and its functional forward."""
    graph = load_graph(export_graph(model, torch.zeros(2, *row)))

    def forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.func.functional_call(graph.module, p, (x,))
        return out

    return graph, forward


def throughput(
    name: str,
    steps: int,
    blocks: int,
    clipping: str,
    clock: Callable[[], float],
    device: str = "cpu",
    modes: tuple[str, ...] = ("eager",),
) -> dict[str, float]:
    """Plain SGD and the runner's DP-SGD, each step mode of ``modes`` (``eager``, ``graph``), in rotating
    blocks; prints and returns each mode's median of the blocks' plain/DP time ratios (the slowdown)."""
    model, row, classes, rows = models()[name]
    graph, forward = functional(model, row)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, *row, generator=gen).to(device)
    y = torch.randint(0, classes, (rows,), generator=gen).to(device)

    def now() -> float:
        if device == "cuda":
            torch.cuda.synchronize()  # the GPU's queue drained: what was asked is done
        return clock()

    loss = loss_function("cross_entropy")
    the_plan = Plan(sample_rate=BATCH / rows, steps=steps, noise_multiplier=1.0)
    spec = TrainSpec(epochs=1, batch_size=BATCH, lr=0.05, optimizer="sgd", max_grad_norm=1.0, target_epsilon=8.0,
                     delta=1e-5, accountant="prv", loss="cross_entropy", seed=0)  # fmt: skip
    dp_params = initialise(graph, "default", 0)
    plain_params = {k: v.to(device).clone().requires_grad_(True) for k, v in dp_params.items()}
    opt = torch.optim.SGD(list(plain_params.values()), lr=0.05)
    order, at = torch.randperm(rows, generator=gen), 0
    dp_rates: dict[str, list[float]] = {m: [] for m in modes}
    plain_rates: list[float] = []
    setups: dict[str, list[float]] = {m: [] for m in modes}
    how: dict[str, str] = {}

    def dp_block(mode: str) -> None:
        nonlocal dp_params
        # a graphed run warms up, then captures at the step after: its time runs from that step's end
        first = WARMUP + 1 if mode == "graph" else 1
        stamps: list[float] = []
        start = now()
        result = train(
            forward, dp_params, x, y, spec, the_plan=the_plan, clipping=clipping, device=device, step=mode,
            on_step=lambda p: stamps.append(now()) if p.step in (first, p.steps) else None,
        )  # fmt: skip
        dp_params = result.params
        how[mode] = result.clipping + (
            f", graph {'on' if result.graph else 'OFF'}, capacity {result.capacity}, {result.overflow} overflowed"
            if mode == "graph"
            else ""
        )
        if result.graph_failed:
            how[mode] += f" (capture failed: {result.graph_failed})"
        setups[mode].append(stamps[0] - start)
        dp_rates[mode].append((steps - first) * BATCH / (stamps[-1] - stamps[0]))

    def plain_block() -> None:
        nonlocal order, at
        start = now()
        for _ in range(steps):
            if at + BATCH > rows:
                order, at = torch.randperm(rows, generator=gen), 0
            idx = order[at : at + BATCH].to(device)
            at += BATCH
            opt.zero_grad()
            loss(forward(plain_params, x[idx]), y[idx]).backward()
            opt.step()
        plain_rates.append(steps * BATCH / (now() - start))

    blocks_in_turn: list[Callable[[], None]] = [plain_block, *(lambda m=m: dp_block(m) for m in modes)]
    for i in range(blocks):  # the order rotates, so drifting load falls on each
        turn = i % len(blocks_in_turn)
        for block in blocks_in_turn[turn:] + blocks_in_turn[:turn]:
            block()
    print(f"  {name:5s} plain SGD {statistics.median(plain_rates):9.0f} samples/s", flush=True)
    out = {}
    for mode in modes:
        ratios = [p / d for p, d in zip(plain_rates, dp_rates[mode], strict=True)]
        ratio = out[mode] = statistics.median(ratios)
        quartiles = "-"
        if len(ratios) >= 4:
            q = statistics.quantiles(ratios, n=4)
            quartiles = f"{q[0]:.2f}-{q[2]:.2f}"
        print(
            f"        DP-SGD {mode:5s} {statistics.median(dp_rates[mode]):9.0f} samples/s   {100 / ratio:5.1f} % of "
            f"plain SGD's, slowdown {ratio:.2f}x (median of the blocks' ratios; quartiles {quartiles}; set-up "
            f"{statistics.median(setups[mode]):.2f} s; {how[mode]})",
            flush=True,
        )
    return out


def devices_agree(name: str) -> None:
    """One noiseless DP-SGD step of ``name`` from the same parameters on the same Poisson sample, on the CPU
    and on CUDA, both ways of clipping: the largest difference of the parameters after it."""
    model, row, classes, rows = models()[name]
    graph, forward = functional(model, row)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4096, *row, generator=gen)
    y = torch.randint(0, classes, (4096,), generator=gen)
    spec = TrainSpec(epochs=1, batch_size=BATCH, lr=0.5, optimizer="sgd", max_grad_norm=1.0, target_epsilon=8.0,
                     delta=1e-5, accountant="prv", loss="cross_entropy", seed=3)  # fmt: skip
    start = initialise(graph, "default", 0)
    one = Plan(sample_rate=BATCH / 4096, steps=1, noise_multiplier=0.0)
    for clipping in ("exact", "auto"):
        on_cpu = train(forward, start, x, y, spec, the_plan=one, clipping=clipping, device="cpu")
        on_gpu = train(forward, start, x, y, spec, the_plan=one, clipping=clipping, device="cuda")
        moved = max(float((on_cpu.params[k] - start[k]).abs().max()) for k in start)
        diff = max(float((on_cpu.params[k] - on_gpu.params[k]).abs().max()) for k in start)
        print(
            f"  {name:5s} {clipping:5s} clipping (cuda: {on_gpu.clipping}): the step moved parameters by up to "
            f"{moved:.3g}; cpu and cuda differ by at most {diff:.3g}",
            flush=True,
        )


UTILITY = {
    # name: (model, the request's epochs, batch_size, optimizer, lr, max_grad_norm)
    "logistic regression": (lambda: nn.Sequential(nn.Linear(30, 2)), 50, 256, "adam", 0.05, 1.0),
    "MLP 30-16-2 (the issue's example)": (
        lambda: nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2)),
        50,
        455,
        "sgd",
        2.0,
        0.3,
    ),
    "MLP 30-256-256-2": (
        lambda: nn.Sequential(nn.Linear(30, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2)),
        20,
        64,
        "adam",
        0.01,
        1.0,
    ),
}


def breast_cancer(split: int = 0) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn LogisticRegression's held-out accuracy, and the split (the rows' permutation seeded by
    ``split``): training rows and targets, held-out rows and targets (standardised with the training rows'
    statistics)."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression

    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(split).permutation(len(x))
    hold, tr = order[:114], order[114:]
    mu, sd = x[tr].mean(0), x[tr].std(0)
    xs = ((x - mu) / sd).astype(np.float32)
    sklearn_acc = LogisticRegression(max_iter=1000).fit(xs[tr], y[tr]).score(xs[hold], y[hold])
    xt, yt, xh, yh = map(torch.from_numpy, (xs[tr], y[tr], xs[hold], y[hold]))
    return float(sklearn_acc), xt, yt, xh, yh


SWEEP = [
    (epochs, batch, optimizer, lr, clip)
    for epochs in (30, 100)
    for batch in (128, 256, 455)
    for optimizer, lrs in (("adam", (0.02, 0.1)), ("sgd", (0.5, 2.0)))
    for lr in lrs
    for clip in (0.3, 1.0)
]
"""The logistic regression's settings ``--sweep`` tries: (epochs, batch_size, optimizer, lr, max_grad_norm)."""


def sweep(seeds: int) -> None:
    """The median held-out accuracy of each :data:`SWEEP` setting at epsilon 1; prints the best five."""
    sklearn_acc, xt, yt, xh, yh = breast_cancer()
    graph, forward = functional(nn.Sequential(nn.Linear(30, 2)), (30,))
    found = []
    for epochs, batch, optimizer, lr, clip in SWEEP:
        accs = []
        for seed in range(seeds):
            spec = TrainSpec(epochs=epochs, batch_size=batch, lr=lr, optimizer=optimizer, max_grad_norm=clip,
                             target_epsilon=1.0, delta=1e-5, accountant="prv", loss="cross_entropy",
                             seed=seed)  # fmt: skip
            result = train(forward, initialise(graph, "default", seed), xt, yt, spec)
            accs.append(evaluate(forward, result.params, xh, yh, "cross_entropy")["accuracy"])
        found.append((statistics.median(accs), f"epochs {epochs}, batch_size {batch}, {optimizer} lr {lr:g}, "
                      f"max_grad_norm {clip:g}"))  # fmt: skip
    found.sort(key=lambda f: -f[0])
    print(f"  logistic regression, {len(SWEEP)} settings, median of {seeds} seeds each; scikit-learn "
          f"{sklearn_acc:.3f}; the best five:")  # fmt: skip
    for acc, setting in found[:5]:
        print(f"    {acc:.3f}  {setting}", flush=True)


OBJECTIVE_LAMBDAS = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
OBJECTIVE_NORMS = (2.0, 4.0, 8.0)


def objective_perturbation(seeds: int, epsilon: float = 1.0) -> None:
    """The logistic regression by objective perturbation (Chaudhuri, Monteleoni and Sarwate, JMLR 2011,
    Algorithm 2; pure epsilon-DP, so no delta at all) on the same split, for comparison with DP-SGD: rows with
    an intercept column are clipped to norm R and divided by it (norm at most 1, as the mechanism needs); the
    mean logistic loss plus (Lambda / 2)|w|^2 plus b.w / n is minimised (L-BFGS), |b| drawn from Gamma(d,
    2 / epsilon'), its direction uniform, epsilon' = epsilon - 2 log(1 + c / (n Lambda)) with c = 1/4 (the loss's
    curvature bound); when that is not positive, an extra regulariser c / (n (e^(epsilon / 4) - 1)) - Lambda
    and epsilon' = epsilon / 2. Prints the median held-out accuracy of each (R, Lambda) and the non-private
    minimiser's, best first."""
    from scipy.optimize import minimize

    _, xt, yt, xh, yh = breast_cancer()
    signs = 2.0 * yt.numpy() - 1.0

    def rows(x: torch.Tensor, bound: float) -> np.ndarray:
        a = np.hstack([x.numpy().astype(np.float64), np.ones((len(x), 1))])
        a /= np.maximum(1.0, np.linalg.norm(a, axis=1, keepdims=True) / bound)
        return a / bound

    def fit(a: np.ndarray, lam: float, b: np.ndarray) -> np.ndarray:
        n = len(a)

        def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
            z = signs * (a @ w)
            loss = np.logaddexp(0.0, -z).mean() + 0.5 * lam * w @ w + b @ w / n
            return float(loss), a.T @ (-signs / (1.0 + np.exp(z))) / n + lam * w + b / n

        w0 = np.zeros(a.shape[1])
        return minimize(objective, w0, jac=True, method="L-BFGS-B", options={"gtol": 1e-10, "maxiter": 5000}).x

    found = []
    for bound in OBJECTIVE_NORMS:
        a, held = rows(xt, bound), rows(xh, bound)
        n, d = a.shape

        def accuracy(w: np.ndarray) -> float:
            return float(((held @ w > 0) == (yh.numpy() > 0)).mean())  # noqa: B023 -- used within this pass

        for lam in OBJECTIVE_LAMBDAS:
            eps_p, extra = epsilon - 2.0 * np.log1p(0.25 / (n * lam)), 0.0
            if eps_p <= 0:
                eps_p, extra = epsilon / 2.0, 0.25 / (n * np.expm1(epsilon / 4.0)) - lam
            accs = []
            for seed in range(seeds):
                rng = np.random.default_rng(seed)
                direction = rng.standard_normal(d)
                b = direction / np.linalg.norm(direction) * rng.gamma(d, 2.0 / eps_p)
                accs.append(accuracy(fit(a, lam + extra, b)))
            found.append((statistics.median(accs), accuracy(fit(a, lam, np.zeros(d))), bound, lam))
    found.sort(key=lambda f: -f[0])
    print(f"  logistic regression by objective perturbation, epsilon {epsilon:g} (delta 0), median of {seeds} seeds; "
          "the best five of " f"{len(found)} settings:")  # fmt: skip
    for acc, plain, bound, lam in found[:5]:
        print(f"    {acc:.3f}  (without noise {plain:.3f})  R {bound:g}, Lambda {lam:g}", flush=True)


GAUSSIAN_OBJECTIVE_LAMBDAS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
GAUSSIAN_OBJECTIVE_NORMS = (1.0, 4.0, 6.0, 8.0)


def gaussian_delta(epsilon: float, mu: float) -> float:
    """The Gaussian mechanism's delta at ``epsilon`` for sensitivity over noise ``mu``."""
    from scipy.stats import norm

    return float(norm.cdf(-epsilon / mu + mu / 2) - np.exp(epsilon) * norm.cdf(-epsilon / mu - mu / 2))


def gaussian_objective_sigma(epsilon: float, delta: float, lam: float, curvature: float = 0.25) -> float | None:
    """The noise of objective perturbation with Gaussian noise that gives (``epsilon``, ``delta``), or None.

    The objective is sum_i l(w; x_i) + (Lambda / 2)|w|^2 + b.w with b ~ N(0, sigma^2 I), rows of norm at most
    1 and a loss l = f(x.w) with |f'| <= 1 and 0 <= f'' <= ``curvature`` (logistic: 1/4); its minimiser is
    released. For a dataset and the same with one row z added, the released w has densities whose log-ratio
    is a Gaussian part plus the log of the Jacobians' ratio, 1 + f'' x.(H + Lambda I)^-1 x, between 1 and
    1 + curvature / Lambda. The Gaussian part, at the noise b that gives w, is (a^2 |x|^2 -+ 2 a b.x) /
    (2 sigma^2) with a = f'(x.w) in [-1, 1], which depends on b; it is at most mu^2 / 2 + mu |Z| with Z
    standard normal and mu = 1 / sigma, whose tail is twice the Gaussian mechanism's. So each direction's
    delta is at most 2 delta_G(epsilon - log(1 + curvature / Lambda), mu) (when that epsilon is at least
    mu^2 / 2), and sigma is the least that keeps it within ``delta``."""
    from scipy.optimize import brentq

    rest = epsilon - float(np.log1p(curvature / lam))
    if rest <= 0:
        return None
    mu = brentq(lambda m: 2 * gaussian_delta(rest, m) - delta, 1e-4, 50.0)
    return 1.0 / mu if rest >= mu * mu / 2 else None


def gaussian_objective_perturbation(seeds: int, epsilon: float = 1.0, delta: float = 1e-5) -> None:
    """The logistic regression by objective perturbation with Gaussian noise (:func:`gaussian_objective_sigma`)
    on the same split: rows with an intercept column clipped to norm R and divided by it, the perturbed
    objective minimised (L-BFGS to a gradient of 1e-12). Prints the median held-out accuracy of each (R,
    Lambda) and the minimiser's without noise, best first."""
    from scipy.optimize import minimize

    _, xt, yt, xh, yh = breast_cancer()
    signs = 2.0 * yt.numpy() - 1.0

    def fit(a: np.ndarray, lam: float, b: np.ndarray) -> np.ndarray:
        def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
            z = signs * (a @ w)
            loss = np.logaddexp(0.0, -z).sum() + 0.5 * lam * w @ w + b @ w
            return float(loss), a.T @ (-signs / (1.0 + np.exp(z))) + lam * w + b

        options = {"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10000}
        return minimize(objective, np.zeros(a.shape[1]), jac=True, method="L-BFGS-B", options=options).x

    held = np.hstack([xh.numpy().astype(np.float64), np.ones((len(xh), 1))])

    def accuracy(w: np.ndarray) -> float:
        return float(((held @ w > 0) == (yh.numpy() > 0)).mean())

    found = []
    for bound in GAUSSIAN_OBJECTIVE_NORMS:
        a = np.hstack([xt.numpy().astype(np.float64), np.ones((len(xt), 1))])
        a = a / np.maximum(1.0, np.linalg.norm(a, axis=1, keepdims=True) / bound) / bound
        for lam in GAUSSIAN_OBJECTIVE_LAMBDAS:
            sigma = gaussian_objective_sigma(epsilon, delta, lam)
            if sigma is None:
                continue
            accs = [
                accuracy(fit(a, lam, np.random.default_rng(seed).standard_normal(a.shape[1]) * sigma))
                for seed in range(seeds)
            ]
            found.append((statistics.median(accs), accuracy(fit(a, lam, np.zeros(a.shape[1]))), bound, lam, sigma))
    found.sort(key=lambda f: -f[0])
    print(f"  logistic regression by objective perturbation with Gaussian noise, epsilon {epsilon:g}, delta "
          f"{delta:g}, median of {seeds} seeds; the best five of {len(found)} settings:")  # fmt: skip
    for acc, plain, bound, lam, sigma in found[:5]:
        print(f"    {acc:.3f}  (without noise {plain:.3f})  R {bound:g}, Lambda {lam:g}, sigma {sigma:.2f}", flush=True)


def utility_on(
    make: Callable[[], nn.Module], setting: tuple[int, int, str, float, float], seeds: int, split: int
) -> tuple[list[float], list[float], list[float]]:
    """Held-out accuracies of ``seeds`` runs of the model under ``setting`` at epsilon 1 on split ``split``, and
    of the same trainer without privacy from the same starts; and the epsilon each private run spent."""
    epochs, batch, optimizer, lr, clip = setting
    _, xt, yt, xh, yh = breast_cancer(split)
    graph, forward = functional(make(), (30,))
    dp, plain, spent = [], [], []
    for seed in range(seeds):
        spec = TrainSpec(epochs=epochs, batch_size=batch, lr=lr, optimizer=optimizer, max_grad_norm=clip,
                         target_epsilon=1.0, delta=1e-5, accountant="prv", loss="cross_entropy",
                         seed=seed)  # fmt: skip
        start = initialise(graph, "default", seed)
        result = train(forward, start, xt, yt, spec)
        dp.append(evaluate(forward, result.params, xh, yh, "cross_entropy")["accuracy"])
        spent.append(result.epsilon)
        the_plan = plan(spec, len(xt))
        open_spec = TrainSpec(**{**spec.__dict__, "max_grad_norm": 1e12})
        no_noise = Plan(the_plan.sample_rate, the_plan.steps, 0.0)
        open_run = train(forward, start, xt, yt, open_spec, the_plan=no_noise)
        plain.append(evaluate(forward, open_run.params, xh, yh, "cross_entropy")["accuracy"])
    return dp, plain, spent


def utility(seeds: int, splits: int = 1) -> None:
    sklearn_acc, xt, _, xh, _ = breast_cancer()
    print(f"  breast_cancer, {len(xt)} training rows, {len(xh)} held out; scikit-learn LogisticRegression "
          f"{sklearn_acc:.3f}")  # fmt: skip
    for name, (make, *setting) in UTILITY.items():
        epochs, batch, optimizer, lr, clip = setting
        dp, plain, spent = utility_on(make, (epochs, batch, optimizer, lr, clip), seeds, 0)
        dp_med, plain_med = statistics.median(dp), statistics.median(plain)
        print(
            f"  {name} (epochs {epochs}, batch_size {batch}, {optimizer} lr {lr:g}, max_grad_norm {clip:g}; "
            f"epsilon spent {max(spent):.3f}):\n"
            f"    DP-SGD {dp_med:.3f} (median of {seeds}: {', '.join(f'{a:.3f}' for a in dp)})\n"
            f"    the same trainer without privacy {plain_med:.3f} ({', '.join(f'{a:.3f}' for a in plain)})\n"
            f"    DP minus non-private: {100 * (dp_med - plain_med):+.1f} points against the same trainer, "
            f"{100 * (dp_med - sklearn_acc):+.1f} against scikit-learn",
            flush=True,
        )
        if splits > 1:
            gaps = [100 * (dp_med - plain_med)]
            for split in range(1, splits):
                dp, plain, _ = utility_on(make, (epochs, batch, optimizer, lr, clip), seeds, split)
                gaps.append(100 * (statistics.median(dp) - statistics.median(plain)))
            print(
                f"    over {splits} splits (permutation seeds 0 to {splits - 1}; the setting was chosen on "
                f"split 0), DP minus the same trainer, in points: {', '.join(f'{g:+.1f}' for g in gaps)}; "
                f"mean {statistics.fmean(gaps):+.2f}, median {statistics.median(gaps):+.1f}",
                flush=True,
            )


WORST = list(range(20, 30))
"""breast_cancer's ten ``worst ...`` columns (each measurement's largest value in the image), named before
training: the margin classifier's features."""


class MarginModel(nn.Module):
    """A linear classifier of one output (its sign is the class); the bias is added at half scale, so that it
    takes less of each row's clipped gradient and of the noise."""

    def __init__(self, width: int = len(WORST)) -> None:
        super().__init__()
        self.linear = nn.Linear(width, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(self.linear(x), self.bias, alpha=0.5)


MARGIN = {"epochs": 25, "batch_size": 455, "optimizer": "sgd", "lr": 1.0, "momentum": 0.5, "max_grad_norm": 0.5}
"""The margin classifier's request (``loss="smooth_hinge"``, ``init="zeros"``): chosen among 216 settings of
epochs, learning rate, momentum, bias scale and loss (smooth hinge or logistic) on splits 0 to 7 (2026-12-07,
a stand-alone noisy full-batch descent with exact Gaussian accounting), then run here on fresh splits."""


def margin_on(split: int, seeds: int) -> tuple[float, list[float], list[float]]:
    """scikit-learn's held-out accuracy on all 30 columns, and the margin classifier's under DP and under the
    same trainer without privacy (no clipping, no noise) from zeros, ``seeds`` runs each, on ``split``."""
    sklearn_acc, xt, yt, xh, yh = breast_cancer(split)
    xt, xh = xt[:, WORST], xh[:, WORST]
    yt, yh = yt.float().reshape(-1, 1), yh.float().reshape(-1, 1)
    graph, forward = functional(MarginModel(), (len(WORST),))
    start = initialise(graph, "zeros", 0)
    dp, plain = [], []
    for seed in range(seeds):
        spec = TrainSpec(**MARGIN, target_epsilon=1.0, delta=1e-5, accountant="prv", loss="smooth_hinge",
                         seed=1000 + seed)  # fmt: skip
        dp.append(evaluate(forward, train(forward, start, xt, yt, spec).params, xh, yh, "smooth_hinge")["accuracy"])
        if seed == 0:  # without noise every run is the same
            the_plan = plan(spec, len(xt))
            open_spec = TrainSpec(**{**spec.__dict__, "max_grad_norm": 1e12})
            open_run = train(
                forward, start, xt, yt, open_spec, the_plan=Plan(the_plan.sample_rate, the_plan.steps, 0.0)
            )
        plain.append(evaluate(forward, open_run.params, xh, yh, "smooth_hinge")["accuracy"])
    return sklearn_acc, dp, plain


def margin(seeds: int, fresh: range) -> None:
    """The margin classifier on the benchmark's split and on ``fresh`` splits (none of which chose its
    setting): how far below scikit-learn's logistic regression on all 30 columns its median of ``seeds``
    runs is, and (on the fresh splits) the mean of its first five runs' median and of all its runs."""
    sk, dp, plain = margin_on(0, seeds)
    print(f"  margin classifier (the 10 worst columns, smooth_hinge, sgd lr {MARGIN['lr']:g} momentum "
          f"{MARGIN['momentum']:g}, max_grad_norm {MARGIN['max_grad_norm']:g}, {MARGIN['epochs']} epochs of full "
          f"batches, from zeros):\n"
          f"    split 0: DP {statistics.median(dp):.3f} (median of {seeds}: {', '.join(f'{a:.3f}' for a in dp)}); "
          f"without privacy {plain[0]:.3f}; scikit-learn on all 30 columns {sk:.3f}: "
          f"{100 * (statistics.median(dp) - sk):+.1f} points", flush=True)  # fmt: skip
    if not fresh:
        return
    median5, mean_all, own = [], [], []
    for split in fresh:
        sk, dp, plain = margin_on(split, seeds)
        median5.append(100 * (sk - statistics.median(dp[:5])))
        mean_all.append(100 * (sk - statistics.fmean(dp)))
        own.append(100 * (plain[0] - statistics.fmean(dp)))
    print(f"    splits {fresh.start} to {fresh.stop - 1} (permutation seeds; not those the setting was chosen on), "
          f"points below scikit-learn on all 30 columns: median of 5 runs {statistics.fmean(median5):.2f} on "
          f"average (the goal: 0.5; {sum(g <= 0.5 for g in median5)} of {len(median5)} splits within it), mean of "
          f"{seeds} runs {statistics.fmean(mean_all):.2f}; below the same trainer without privacy "
          f"{statistics.fmean(own):.2f}", flush=True)  # fmt: skip


def first_step() -> None:
    if os.geteuid() != 0:
        print("  submit to first step: skipped (run as root: the runner drops to its own account)")
        return
    from paitient.config import load
    from paitient.kernel.jobs.client import Job, JobsClient
    from paitient.ops.demodata import publish_demo
    from paitient.registry import Member, Registry
    from paitient.services.jobs.runner import Runner
    from paitient.services.jobs.service import JobsService
    from paitient.services.jobs.store import JobStore
    from paitient.services.kit.channel import ChannelServer
    from paitient.services.kit.process import socket_path
    from paitient.services.ledger.service import LedgerService
    from paitient.services.ledger.store import Ledger
    from tests import rootmember

    root = Path(tempfile.mkdtemp(prefix="bench-jobs-", dir="/tmp"))
    os.chmod(root, 0o755)
    account = f"ptb{os.getpid() % 100000}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", account], check=True)
    servers: list[ChannelServer] = []
    runner = None
    try:
        site = load(None, overrides={"workspace": {"state_dir": str(root / "state")}, "jobs": {"account": account}})
        publish_demo(site)
        registry = Registry.for_state_dir(site.state_dir)
        rootmember.put(registry, Member("alice", "root", 0, ("oncology",), ("researcher",)))
        ledger = LedgerService(site, Ledger(site), registry, logging.getLogger("bench"))
        store, wake = JobStore(site.state_dir), threading.Event()
        servers = [
            ChannelServer(socket_path(site, "ledger"), ledger.handlers()),
            ChannelServer(socket_path(site, "jobs"), JobsService(site, store, registry, wake=wake).handlers()),
        ]
        for s in servers:
            s.start_in_thread()
        runner = Runner(site, store, registry, wake=wake)
        runner.start()
        client = JobsClient(site.run_dir)
        times = []
        for _ in range(3):
            program = export_graph(nn.Sequential(nn.Linear(30, 2)), torch.zeros(2, 30))
            request = dict(dataset="breast_cancer", target="target", epochs=50, batch_size=64, max_grad_norm=1.0,
                           target_epsilon=1.0)  # fmt: skip
            start = time.perf_counter()
            job = Job(client.submit(program, request), client)
            while not job.progress.get("step"):
                if job.state in ("failed", "cancelled"):
                    raise SystemExit(f"the benchmark's job {job.state}: {job.reason}")
                time.sleep(0.02)
            times.append(time.perf_counter() - start)
            job.cancel()
            while job.state not in ("cancelled", "failed", "done"):
                time.sleep(0.1)
        each = ", ".join(f"{t:.2f}" for t in times)
        print(f"  submit to first step: {statistics.median(times):.2f} s (median of 3; {each})", flush=True)
        # one job to the end: where the runner's sandbox trained it, as its audit record says
        program = export_graph(nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2)), torch.zeros(2, 30))
        start = time.perf_counter()
        job = Job(client.submit(program, {**request, "epochs": 20}), client)
        job.wait(timeout=600, widget=False, poll=0.2)
        took = time.perf_counter() - start
        done = [
            e["details"]
            for f in (site.state_dir / "audit").glob("*.jsonl")
            for e in map(json.loads, f.read_text().splitlines())
            if e.get("action") == "jobs.run" and e.get("object") == job.id and e["details"].get("state") == "done"
        ]
        how = f"on {done[0].get('device')}, {done[0].get('clipping')} clipping" if done else "(no audit record)"
        print(f"  a job of 20 epochs from submit to signed record: {took:.2f} s, trained {how}", flush=True)
    finally:
        if runner is not None:
            runner.stop()
        for s in servers:
            s.shutdown()
            s.server_close()
        remove_account(account)
        shutil.rmtree(root, ignore_errors=True)


def remove_account(account: str, timeout: float = 10.0) -> None:
    """End what still runs as the benchmark's account (a cancelled job's worker) and remove the account."""
    deadline = time.monotonic() + timeout
    while True:
        subprocess.run(["pkill", "-KILL", "-u", account], capture_output=True)
        if subprocess.run(["userdel", account], capture_output=True).returncode in (0, 6):
            return
        if time.monotonic() > deadline:
            print(f"  could not remove the account {account}; remove it with: userdel {account}")
            return
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> None:
    global BATCH
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per timed block")
    ap.add_argument("--blocks", type=int, default=7, help="pairs of timed blocks (median ratio reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both trainers run")
    ap.add_argument("--batch", type=int, default=BATCH, help="(expected) batch size of the throughput runs")
    ap.add_argument("--models", default="MLP,CNN,CNN2")
    ap.add_argument("--exact", action="store_true", help="also time the exact way (a gradient per row)")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: the calling thread's CPU time, which other work on a shared machine disturbs far less than "
        "wall time; it counts all the work only with --threads 1",
    )
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument(
        "--splits",
        type=int,
        default=1,
        help="utility: also compare DP with the same trainer without privacy on this many 80/20 splits in all "
        "(the settings were chosen on the first), for how far one split's result generalises",
    )
    ap.add_argument(
        "--fresh",
        default="8:48",
        help="utility: the margin classifier's fresh splits FIRST:END (permutation seeds; empty: split 0 only)",
    )
    ap.add_argument(
        "--sweep", action="store_true", help="also try the logistic regression's utility under many settings"
    )
    ap.add_argument(
        "--objective",
        action="store_true",
        help="also train the logistic regression by objective perturbation (pure and Gaussian), for comparison "
        "with DP-SGD",
    )
    ap.add_argument(
        "--graph",
        choices=("both", "on", "off"),
        default="both",
        help="--device cuda: time DP-SGD with its step captured as a CUDA graph (on), eager (off), or both",
    )
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: agree, throughput, utility, runner")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if args.clock == "cpu" and args.threads != 1:
        raise SystemExit("--clock cpu measures the calling thread: use it with --threads 1")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    BATCH = args.batch
    if args.device == "cuda":
        if args.graph != "off" and "throughput" not in skip and args.steps < WARMUP + 3:
            raise SystemExit(f"--graph: a block needs at least {WARMUP + 3} steps ({WARMUP} warm up, one captures)")
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no GPU here")
        if args.clock == "cpu":
            raise SystemExit("--device cuda is timed by the wall clock: leave out --clock cpu")
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        if "agree" not in skip:
            print("cpu and cuda agree:")
            for name in args.models.split(","):
                devices_agree(name)
    if "throughput" not in skip:
        print(f"throughput on {args.device} (batch {BATCH}, {args.steps} steps a block, {args.blocks} pairs, "
              f"{args.threads} threads, {args.clock} clock):")  # fmt: skip
        modes = ("eager",)
        if args.device == "cuda":
            modes = {"both": ("graph", "eager"), "on": ("graph",), "off": ("eager",)}[args.graph]
        for name in args.models.split(","):
            throughput(name, args.steps, args.blocks, "auto", clock, args.device, modes)
            if args.exact:
                steps = max(3, args.steps // 10) if args.device == "cpu" else args.steps
                throughput(name, steps, max(1, args.blocks // 3), "exact", clock, args.device, modes)
    if "utility" not in skip:
        print("utility (epsilon 1, delta 1e-5):")
        utility(args.seeds, args.splits)
        first, _, last = args.fresh.partition(":")
        margin(args.seeds, range(int(first), int(last)) if args.fresh else range(0))
        if args.sweep:
            sweep(args.seeds)
        if args.objective:
            objective_perturbation(args.seeds)
            gaussian_objective_perturbation(args.seeds)
    if "runner" not in skip:
        print("the runner for real:")
        first_step()


if __name__ == "__main__":
    with made_groups_removed(workspace=True):  # the groups its publications made
        main()
