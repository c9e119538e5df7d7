"""On a GPU: the DP-SGD step captured as a CUDA graph gives what the same padded step gives eagerly, and its
noise is new at every replay.

    PYTHONPATH=extensions python3 benchmarks/check_graph.py [--steps 12]

1. Without noise (noise multiplier 0: no accountant, so this needs no opacus), the runner's ``train`` from
   the same parameters and seed, so the same Poisson samples, with ``step="graph"`` and ``step="padded"``
   (and ``"eager"``, unpadded): the MLP, the CNN and CNN2 of ``bench_jobs.py``, both ways of clipping, SGD
   and Adam (capturable). The graphed run must have been captured and replayed, and its parameters must be
   the padded run's to float32 rounding (and the unpadded run's to a little more: other kernels add in
   another order).
2. With noise: one padded step on fixed rows and a learning rate of 0 (so every step's clipped sum is the
   same), captured and replayed; each step's noise (its buffer less the noiseless clipped sum) must differ
   from every other step's, the warm-up steps' included, and have the planned standard deviation.

Prints one line per check and ``graph check: PASS`` or ``graph check: FAIL (n)``; exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "extensions"))

from bench_jobs import functional, models  # noqa: E402

from paitient.services.jobs.graph import initialise  # noqa: E402
from paitient.services.jobs.padded import WARMUP, PaddedStep, Stepper  # noqa: E402
from paitient.services.jobs.persample import FastClipper  # noqa: E402
from paitient.services.jobs.train import Plan, TrainSpec, full_precision, sample_losses, train  # noqa: E402

failures: list[str] = []


def check(ok: bool, line: str) -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {line}", flush=True)
    if not ok:
        failures.append(line)


def largest(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def same_steps(name: str, steps: int) -> None:
    model, row, classes, _ = models()[name]
    graph, forward = functional(model, row)
    gen = torch.Generator().manual_seed(7)
    rows = 4096
    x = torch.randn(rows, *row, generator=gen)
    y = torch.randint(0, classes, (rows,), generator=gen)
    start = initialise(graph, "default", 0)
    the_plan = Plan(sample_rate=256 / rows, steps=steps, noise_multiplier=0.0)
    for optimizer, lr in (("sgd", 0.2), ("adam", 0.01)):
        spec = TrainSpec(epochs=1, batch_size=256, lr=lr, optimizer=optimizer, max_grad_norm=1.0,
                         target_epsilon=8.0, delta=1e-5, accountant="prv", loss="cross_entropy", seed=5)  # fmt: skip
        for clipping in ("auto", "exact"):
            run = {
                mode: train(forward, start, x, y, spec, the_plan=the_plan, clipping=clipping, device="cuda", step=mode)
                for mode in ("graph", "padded", "eager")
            }
            g = run["graph"]
            moved = largest(run["padded"].params, start)
            to_padded, to_eager = largest(g.params, run["padded"].params), largest(g.params, run["eager"].params)
            failed = f"; capture failed: {g.graph_failed}" if g.graph_failed else ""
            check(
                g.graph and not g.graph_failed,
                f"{name:4s} {optimizer:4s} {clipping:5s} ({g.clipping}): captured and replayed "
                f"(graph {g.graph}, capacity {g.capacity}, {g.overflow} overflowed{failed})",
            )
            check(
                moved > 0 and to_padded <= 1e-5 * max(1.0, moved),
                f"{name:4s} {optimizer:4s} {clipping:5s}: graph vs padded eager differ by {to_padded:.3g} "
                f"(the steps moved parameters by up to {moved:.3g})",
            )
            # Adam divides by each gradient's own size: with no noise, a component near 0 that other kernels
            # round to the other side moves by up to the learning rate, whatever the padding. So the unpadded
            # comparison is a check for SGD and a figure for Adam (the padded one above is exact for both; the
            # CPU tests show padded equals unpadded for Adam too).
            line = f"{name:4s} {optimizer:4s} {clipping:5s}: graph vs unpadded eager differ by {to_eager:.3g}"
            if optimizer == "sgd":
                check(to_eager <= 1e-4 * max(1.0, moved), line)
            else:
                print(f"  info {line} (learning rate {lr:g}; not a check, see above)", flush=True)
            check(
                all(math.isfinite(v) for v in g.losses)
                and abs(g.losses[-1] - run["padded"].losses[-1]) <= 1e-5 * max(1.0, abs(g.losses[-1])),
                f"{name:4s} {optimizer:4s} {clipping:5s}: mean loss {g.losses[-1]:.6g} (padded eager "
                f"{run['padded'].losses[-1]:.6g})",
            )  # fmt: skip


@full_precision()
def fresh_noise(replays: int) -> None:
    model, row, classes, _ = models()["MLP"]
    graph, forward = functional(model, row)
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(512, *row, generator=gen).to(device)
    y = torch.randint(0, classes, (512,), generator=gen).to(device)
    params = initialise(graph, "default", 0)
    losses_of = sample_losses("cross_entropy")
    sigma, c, expected = 1.0, 1.0, 64.0

    def padded_step(noise_std: float, noise_gen: torch.Generator) -> PaddedStep:
        leaves = {k: v.to(device).clone().requires_grad_(True) for k, v in params.items()}
        sizes = [v.numel() for v in leaves.values()]
        noise = torch.empty(sum(sizes), device=device)
        views = {k: p.view(leaves[k].shape) for k, p in zip(leaves, torch.split(noise, sizes), strict=True)}
        return PaddedStep(
            forward, losses_of, leaves, torch.optim.SGD(list(leaves.values()), lr=0.0), x, y, capacity=96,
            max_grad_norm=c, scale=1 / expected, noise_std=noise_std, noise=noise, views=views, noise_gen=noise_gen,
            loss_sum=torch.zeros((), dtype=torch.float64, device=device), fast=FastClipper(forward, losses_of),
        )  # fmt: skip

    rows = torch.arange(0, 512, 8)  # 64 rows, the same at every step
    clean = padded_step(0.0, torch.Generator(device=device).manual_seed(1))
    clean(rows)
    noise_gen = torch.Generator(device=device).manual_seed(11)
    noisy = padded_step(sigma * c / expected, noise_gen)

    def unpadded(_: torch.Tensor) -> None:
        raise AssertionError("every step here fits the capacity")

    stepper = Stepper(noisy, unpadded, capture=True, generators=(noise_gen,))
    draws = []
    for _ in range(WARMUP + replays):
        stepper(rows)
        draws.append((noisy.noise - clean.noise).clone())
    check(stepper.captured and stepper.replays == replays, f"noise: captured, {stepper.replays} replays")
    d = torch.stack(draws)
    same = sum(int(torch.equal(d[i], d[j])) for i in range(len(d)) for j in range(i + 1, len(d)))
    check(same == 0, f"noise: {len(d)} steps' noise ({WARMUP} warm-up, {replays} replayed), {same} pairs alike")
    std, want = float(d[WARMUP:].std()), sigma * c / expected
    check(abs(std / want - 1) < 0.02, f"noise: the replays' standard deviation {std:.5g}, planned {want:.5g}")
    corr = float(torch.corrcoef(d[WARMUP:])[0, 1:].abs().max())
    check(corr < 0.02, f"noise: largest correlation of the first replay's noise with a later one {corr:.3g}")
    moved = max(float((noisy.leaves[k] - clean.leaves[k]).detach().abs().max()) for k in params)
    check(moved == 0.0, "noise: a learning rate of 0 left the parameters as they were")


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="steps of each compared run (warm-up, capture, replays)")
    ap.add_argument("--models", default="MLP,CNN,CNN2")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if not torch.cuda.is_available():
        print("graph check: torch sees no GPU here")
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    print("a graphed run is the padded eager run (noise multiplier 0):", flush=True)
    for name in args.models.split(","):
        same_steps(name, args.steps)
    print("noise is new at every replay:", flush=True)
    fresh_noise(8)
    print("graph check: PASS" if not failures else f"graph check: FAIL ({len(failures)})", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
