"""Audit trail throughput: records per second for emit() (flock, chain, fsync each) against plain append+fsync.

    /opt/paitient/venv/bin/python benchmarks/bench_audit.py [--records 2000] [--batch 100] [--procs 4] [--dir DIR]

The baseline writes exactly the bytes emit() wrote, one line per write and fsync, to a file in the same
directory, in the same run: the ratio is the cost of locking, reading the chain's tail and hashing.
Batch mode (``AuditLog.append_many``) shares one lock and one fsync among several records. ``--backlog N``
also appends N records in one call, as a service writes the records that waited while the trail was down
once it is back, and prints its rate against the batches of ``--batch`` (a ratio near 1 or above: a long
batch costs no more per record than short ones).

``--executes N`` also times what an execution now waits for before it reaches the kernel (auditing fails
closed): :func:`paitient.server.audit.send` of a cell's record to ``paitient service audit`` running in its
own process on its real 0660 socket, admission included; median and p90 in ms.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from paitient.config import load
from paitient.services.audit import emit
from paitient.services.audit.writer import AuditLog, trail_files


def _site(state: Path):
    return load(None, overrides={"workspace": {"state_dir": str(state)}})


def bench_emit(state: Path, n: int) -> float:
    site = _site(state)
    t = time.perf_counter()
    for i in range(n):
        emit(site, actor="alice", action="cell.execute", object=f"k{i % 7}", details={"code": f"x = {i}\n" * 4})
    return time.perf_counter() - t


def bench_baseline(lines: list[bytes], path: Path) -> float:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        t = time.perf_counter()
        for line in lines:
            os.write(fd, line)
            os.fsync(fd)
        return time.perf_counter() - t
    finally:
        os.close(fd)


def bench_batch(directory: Path, n: int, batch: int) -> float:
    log = AuditLog(directory)
    events = [
        {"actor": "alice", "action": "cell.execute", "object": f"k{i % 7}", "details": {"code": f"x = {i}\n" * 4}}
        for i in range(n)
    ]
    t = time.perf_counter()
    for i in range(0, n, batch):
        log.append_many(events[i : i + batch])
    return time.perf_counter() - t


def _proc(state: str, n: int) -> None:
    bench_emit(Path(state), n)


def bench_procs(state: Path, n: int, procs: int) -> float:
    ctx = multiprocessing.get_context("fork")
    ps = [ctx.Process(target=_proc, args=(str(state), n // procs)) for _ in range(procs)]
    t = time.perf_counter()
    for p in ps:
        p.start()
    for p in ps:
        p.join()
    return time.perf_counter() - t


def bench_executes(state: Path, n: int) -> list[float]:
    """Seconds of each ``send`` of a cell.execute record to a real audit service (as root: no rate limit)."""
    from paitient.server.audit import send

    site = _site(state)
    proc = subprocess.Popen(
        [sys.executable, "-m", "paitient.cli", "service", "audit", f"--state-dir={state}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not (site.run_dir / "audit.sock").exists():
            if proc.poll() is not None:
                raise SystemExit("the audit service did not start")
            time.sleep(0.05)
        took = []
        for i in range(n):
            t = time.perf_counter()
            send(site.run_dir, action="cell.execute", object="k", details={"code": f"x = {i}\n" * 4}, timeout=5)
            took.append(time.perf_counter() - t)
        return took
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5, help="alternate emit and baseline this many times; medians")
    ap.add_argument("--batch", type=int, default=100, help="records per append_many call (0: skip batch mode)")
    ap.add_argument("--backlog", type=int, default=20_000, help="records in one append_many call (0: skip)")
    ap.add_argument("--procs", type=int, default=4, help="concurrent emitting processes (0: skip)")
    ap.add_argument("--executes", type=int, default=0, help="time N execute records through the service")
    ap.add_argument("--dir", default="", help="where to write (default: a temp dir under /var/tmp, a real disk)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="paitient-bench-audit-", dir=args.dir or "/var/tmp"))  # noqa: S108
    try:
        n = args.records // args.rounds
        emit_rates, base_rates, ratios = [], [], []
        for r in range(args.rounds):
            # The same disk is shared with other work: alternate the two so both see the same conditions.
            t_emit = bench_emit(root / "emit", n)
            trail = [ln for _, p in trail_files(root / "emit" / "audit") for ln in p.read_bytes().splitlines(True)]
            t_base = bench_baseline(trail[-n:], root / f"baseline-{r}.jsonl")
            emit_rates.append(n / t_emit)
            base_rates.append(n / t_base)
            ratios.append(t_base / t_emit)
        line = sum(map(len, trail[-n:])) / n
        print(f"records: {n} x {args.rounds} rounds, mean line {line:.0f} bytes, dir {root}")
        print(f"plain append+fsync : {statistics.median(base_rates):9.0f} records/s (median)")
        print(
            f"emit (fsync each)  : {statistics.median(emit_rates):9.0f} records/s (median)   "
            f"ratio emit/plain = {statistics.median(ratios):.2f} (rounds {min(ratios):.2f}..{max(ratios):.2f})"
        )
        if args.batch:
            t_batch = bench_batch(root / "batch" / "audit", n * args.rounds, args.batch)
            print(f"append_many({args.batch:<4d})  : {n * args.rounds / t_batch:9.0f} records/s")
            if args.backlog:
                t_backlog = bench_batch(root / "backlog" / "audit", args.backlog, args.backlog)
                ratio = (args.backlog / t_backlog) / (n * args.rounds / t_batch)
                print(
                    f"append_many({args.backlog}), a backlog: {args.backlog / t_backlog:9.0f} records/s, "
                    f"{ratio:.2f}x the rate of batches of {args.batch}"
                )
        if args.procs:
            t_procs = bench_procs(root / "procs", n * args.rounds, args.procs)
            print(f"emit, {args.procs} processes : {n * args.rounds / t_procs:9.0f} records/s (one chain, shared lock)")
        if args.executes:
            took = sorted(bench_executes(root / "service", args.executes))
            med, p90 = statistics.median(took) * 1e3, took[int(0.9 * len(took))] * 1e3
            print(f"execute, recorded first: {med:.2f} ms median, {p90:.2f} ms p90 added per cell ({len(took)} cells)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
