"""Throughput of private training: plain SGD, paitient.kernel.dp, Opacus hooks (default) and Opacus ghost clipping.

One run: ``/opt/paitient/venv/bin/python benchmarks/bench_dp.py``. The model and data are the ones the
project's goal is stated on: an MLP 64-256-256-2 on 200k x 64 rows, batch 512, 2 threads.

All DP modes get the same Poisson-sampled batches (paitient's sampler over an in-memory TensorDataset),
and plain SGD the same batch size from a shuffled in-memory sampler, so the numbers compare the
gradient computation, not data loading. paitient.kernel.dp runs through ``make_private`` against a real
ledger service (in this process, on a temporary socket). The modes take turns, one block of
``--steps`` steps each, ``--blocks`` rounds, so all see the same machine load; each reports its median
block (Opacus hooks, ~60x slower, runs fewer steps per block).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2))


def data(rows: int = 200_000) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 64, generator=g)
    y = (x @ torch.randn(64, generator=g) > 0).long()
    return TensorDataset(x, y)


class ShuffledBatches(Sampler[torch.Tensor]):
    """Index tensors of a fresh permutation, ``batch`` at a time (one indexing operation per batch)."""

    def __init__(self, n: int, batch: int):
        self.n, self.batch = n, batch

    def __len__(self) -> int:
        return self.n // self.batch

    def __iter__(self):
        perm = torch.randperm(self.n)
        for i in range(len(self)):
            yield perm[i * self.batch : (i + 1) * self.batch]


def plain_loader(ds: TensorDataset, batch: int) -> DataLoader:
    return DataLoader(ds, sampler=ShuffledBatches(len(ds), batch), batch_size=None, collate_fn=lambda b: b)


class Bench:
    """One mode's training loop over its loader, timed in blocks of optimizer steps."""

    def __init__(self, model, opt, criterion, loader):
        self.model, self.opt, self.criterion, self.loader = model, opt, criterion, loader
        self.it = iter(loader)
        self.rates: list[float] = []

    def _batch(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)

    def block(self, steps: int, record: bool = True) -> None:
        samples, t0 = 0, time.perf_counter()
        for _ in range(steps):
            x, y = self._batch()
            self.opt.zero_grad()
            self.criterion(self.model(x), y).backward()
            self.opt.step()
            samples += len(x)
        if record:
            self.rates.append(samples / (time.perf_counter() - t0))

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)


def ledger_in_process(tmp: Path):
    """A real ledger service for this process (uid registered as a researcher of project 'bench')."""
    from paitient.config import parse
    from paitient.registry import Member, Registry
    from paitient.services.kit.channel import ChannelServer
    from paitient.services.ledger.service import LedgerService
    from paitient.services.ledger.store import Ledger

    site = parse(
        tomllib.loads(f"""
        [workspace]
        state_dir = "{tmp}"
        [[projects]]
        name = "bench"
        group = "bench"
        datasets = ["synthetic"]
        budget = {{ epsilon = 1000.0, delta = 1e-3 }}
    """)
    )
    Registry.for_state_dir(tmp).put(Member("bench", "bench", os.getuid(), ("bench",)))
    svc = LedgerService(site, Ledger(site), Registry.for_state_dir(tmp), logging.getLogger("bench"))
    server = ChannelServer(site.run_dir / "ledger.sock", svc.handlers(), name="ledger")
    server.start_in_thread()
    return site, server


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per timed block")
    ap.add_argument("--blocks", type=int, default=3, help="timed blocks per mode (median reported)")
    ap.add_argument("--hooks-steps", type=int, default=8, help="steps per block for Opacus hooks (slow)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    from opacus import PrivacyEngine

    from paitient import dp
    from paitient.kernel.dp.sampling import poisson_loader

    ds, batch, crit = data(), 512, nn.CrossEntropyLoss()
    base = DataLoader(ds, batch_size=batch)
    benches: dict[str, Bench] = {}
    steps = {"Opacus hooks": args.hooks_steps}

    torch.manual_seed(0)
    model = mlp()
    benches["plain SGD"] = Bench(model, torch.optim.SGD(model.parameters(), lr=0.05), crit, plain_loader(ds, batch))

    tmp = tempfile.TemporaryDirectory(prefix="paitient-bench-")
    site, server = ledger_in_process(Path(tmp.name))
    model = mlp()
    run = dp.make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        base,
        target_epsilon=8.0,
        epochs=1,
        max_grad_norm=1.0,
        project="bench",
        dataset="synthetic",
        criterion=crit,
        run_dir=site.run_dir,
        progress=False,
    )
    if 5 + args.blocks * args.steps > run.planned_steps:
        ap.error(f"--steps x --blocks must stay below {run.planned_steps - 5} (one epoch)")
    ours = f"paitient.kernel.dp ({run.mode})"
    benches[ours] = Bench(run.model, run.optimizer, crit, run.data_loader)

    for mode in ("ghost", "hooks"):
        model = mlp()
        loader = poisson_loader(base)  # the same Poisson batches as paitient.kernel.dp
        out = PrivacyEngine(accountant="prv").make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
            data_loader=loader,
            criterion=crit,
            noise_multiplier=run.noise_multiplier,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode=mode,
        )
        if mode == "ghost":
            pm, popt, pcrit, ploader = out
        else:
            (pm, popt, ploader), pcrit = out, crit
        benches[f"Opacus {mode}"] = Bench(pm, popt, pcrit, ploader)

    try:
        for b in benches.values():
            b.block(3, record=False)  # warm-up
        for _ in range(args.blocks):  # round robin, so every mode sees the same machine load
            for name, b in benches.items():
                b.block(steps.get(name, args.steps))
        run.finish()
    finally:
        server.shutdown()
        server.server_close()
        tmp.cleanup()
    results = {name: b.rate for name, b in benches.items()}

    plain = results["plain SGD"]
    ours, ghost = results[ours], results["Opacus ghost"]
    print(
        f"MLP 64-256-256-2, {len(ds)} x 64 rows, batch {batch}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print(f"{'mode':<24}{'samples/s':>12}{'time vs plain':>15}")
    for name, rate in results.items():
        print(f"{name:<24}{rate:>12,.0f}{plain / rate:>14.2f}x")
    print(
        f"paitient.kernel.dp vs plain SGD: {plain / ours:.2f}x the time (goal <= 1.5x); "
        f"vs Opacus ghost: {ours / ghost:.2f}x the speed (goal >= 1)"
    )


if __name__ == "__main__":
    sys.exit(main())
