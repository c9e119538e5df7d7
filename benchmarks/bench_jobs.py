"""Certified training: the runner's DP-SGD against plain SGD of the same model, its utility, and submit to first step.

    /opt/paitient/venv/bin/python benchmarks/bench_jobs.py [--rows 20000] [--steps 30] [--seeds 5]

Throughput: samples per second of the runner's training step (Poisson sampling, per-sample gradients with
vmap over the functional graph, clipping, noise) and of plain SGD of the same exported graph on the same
rows, in alternating blocks so machine load falls on both; for the MLP of bench_dp.py (64-256-256-2) and a
small CNN on 28x28 inputs. Utility: breast_cancer, logistic regression at epsilon 1 (delta 1e-5), the same
split, median of --seeds seeds, against the non-private fit. Submit to first step: the runner for real (ledger
on its socket, the worker in the sandbox as a fresh account), from submit until the first progress report;
needs root. Goals (issue 13): <= 1.5x plain SGD on the MLP, <= 2x on the CNN; accuracy within 0.5 points of
the non-private one; submit to first step <= 5 s.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paitient.kernel.jobs.export import export_graph  # noqa: E402
from paitient.services.jobs.graph import initialise, load_graph  # noqa: E402
from paitient.services.jobs.train import Plan, TrainSpec, evaluate, loss_function, train  # noqa: E402


def spec(**kw) -> TrainSpec:
    base = dict(epochs=1, batch_size=512, lr=0.1, optimizer="sgd", max_grad_norm=1.0, target_epsilon=1.0,
                delta=1e-5, accountant="prv", loss="cross_entropy", seed=0)  # fmt: skip
    return TrainSpec(**{**base, **kw})


def throughput(name: str, model: nn.Module, row: tuple[int, ...], classes: int, rows: int, steps: int) -> float:
    graph = load_graph(export_graph(model, torch.zeros(2, *row)))
    forward = lambda p, x: torch.func.functional_call(graph.module, p, (x,))  # noqa: E731
    x, y = torch.randn(rows, *row), torch.randint(0, classes, (rows,))
    batch = 512
    the_plan = Plan(sample_rate=batch / rows, steps=steps, noise_multiplier=1.0)
    loss = loss_function("cross_entropy")

    def dp_block() -> float:
        start = time.perf_counter()
        train(forward, initialise(graph, "default", 0), x, y, spec(), the_plan=the_plan)
        return steps * batch / (time.perf_counter() - start)

    def plain_block() -> float:
        params = {k: v.requires_grad_(True) for k, v in initialise(graph, "default", 0).items()}
        opt = torch.optim.SGD(list(params.values()), lr=0.1)
        order = torch.randperm(rows)
        start = time.perf_counter()
        for i in range(steps):
            idx = order[(i * batch) % (rows - batch) :][:batch]
            opt.zero_grad()
            loss(forward(params, x[idx]), y[idx]).backward()
            opt.step()
        return steps * batch / (time.perf_counter() - start)

    dp, plain = [], []
    for _ in range(3):
        plain.append(plain_block())
        dp.append(dp_block())
    ratio = statistics.median(plain) / statistics.median(dp)
    print(
        f"  {name:4s} plain SGD {statistics.median(plain):9.0f} samples/s   runner DP-SGD {statistics.median(dp):9.0f}"
        f" samples/s   slowdown {ratio:.2f}x"
    )
    return ratio


def utility(seeds: int) -> None:
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression

    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    hold, tr = order[:114], order[114:]
    mu, sd = x[tr].mean(0), x[tr].std(0)
    xs = ((x - mu) / sd).astype(np.float32)
    plain = LogisticRegression(max_iter=1000).fit(xs[tr], y[tr]).score(xs[hold], y[hold])
    xt, yt, xh, yh = map(torch.from_numpy, (xs[tr], y[tr], xs[hold], y[hold]))
    graph = load_graph(export_graph(nn.Sequential(nn.Linear(30, 2)), torch.zeros(2, 30)))
    forward = lambda p, v: torch.func.functional_call(graph.module, p, (v,))  # noqa: E731
    accs = []
    for seed in range(seeds):
        s = spec(epochs=20, batch_size=64, lr=0.5, seed=seed)
        result = train(forward, initialise(graph, "default", seed), xt, yt, s)
        accs.append(evaluate(forward, result.params, xh, yh, "cross_entropy")["accuracy"])
    print(
        f"  breast_cancer logistic regression, epsilon 1: {statistics.median(accs):.3f} (median of {seeds}; "
        f"{', '.join(f'{a:.3f}' for a in accs)}); non-private {plain:.3f}; "
        f"difference {100 * (plain - statistics.median(accs)):+.1f} points"
    )


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    logging.basicConfig(level=logging.WARNING)
    print(f"throughput ({args.rows:,} rows, batch 512, {args.steps} steps a block, median of 3 blocks):")
    mlp = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2))
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 13 * 13, 10))
    throughput("MLP", mlp, (64,), 2, args.rows, args.steps)
    throughput("CNN", cnn, (1, 28, 28), 10, args.rows, max(5, args.steps // 3))
    print("utility:")
    utility(args.seeds)
    print("the runner for real:")
    first_step()


if __name__ == "__main__":
    main()
