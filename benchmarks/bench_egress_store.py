"""The egress counts store's calls, one at a time, as the egress service makes them.

    /opt/paitient/venv/bin/python benchmarks/bench_egress_store.py [--repeat 2000] [--rows 20]
        [--database-url postgresql://USER@/DB?host=/run/postgresql --passfile FILE]

In a temporary state directory (or in ``--database-url``'s PostgreSQL database, schema ``egress``), a day
with some counts already: then, alternately, ``day`` and ``revealed`` (a user's counts and the 150 rows they
saw today: what the service reads at a user's first output of the day), ``add`` of an output without rows
(the common case), ``add`` of one with ``--rows`` new rows (another user's), ``add_withheld``, and
``add_counts`` of ten outputs of one user's day together (what the service's writer does with the counts
that queued up while it wrote the last ones). No output waits for any of these: the service decides on the
counts it holds and writes them behind its answers (:mod:`paitient.services.egress.counts`).
Prints the median and p90 of each in microseconds.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "extensions"))

from paitient.config import parse  # noqa: E402
from paitient.services.egress.store import EgressStore  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2000, help="calls of each kind")
    ap.add_argument("--rows", type=int, default=20, help="rows of an output that shows rows")
    ap.add_argument("--database-url", default="", help="a PostgreSQL [database] url (default: SQLite)")
    ap.add_argument("--passfile", default="", help="[database] passfile for --database-url")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-egress-store-", dir="/tmp"))
    try:
        database = {"url": args.database_url, "passfile": args.passfile} if args.database_url else {}
        site = parse({"workspace": {"state_dir": str(base / "state")}, "database": database})
        store = EgressStore.for_site(site)
        day = "2026-12-04"
        for user in range(50):  # other users' counts, and this user's earlier outputs
            store.add(f"user{user}", day, size=10_000, rows={"onc/bc": range(user * 100, user * 100 + 100)})
        store.add("alice", day, size=10_000, rows={"onc/bc": range(0, 300, 2)})  # 150 rows seen today
        asked = {"onc/bc": list(range(100, 100 + args.rows))}  # half of them seen (the even ones)
        fresh = itertools.count(1_000_000, args.rows)

        def add_rows() -> None:  # new rows for the other users (alice's day stays as it is)
            first = next(fresh)
            store.add(f"user{first % 50}", day, size=10_000, rows={"onc/bc": range(first, first + args.rows)})

        calls = {
            "day": lambda: store.day("alice", day),
            "revealed": lambda: store.revealed("alice", day),
            "add": lambda: store.add("alice", day, size=10_000, rows={}),
            "add rows": add_rows,
            "withheld": lambda: store.add_withheld("alice", day),
            "add 10": lambda: store.add_counts("alice", day, size=100_000, outputs=10, rows=asked),
        }
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.repeat // 10):  # alternate, so drift hits every kind
            for name, call in calls.items():
                for _ in range(10):
                    t0 = time.perf_counter()
                    call()
                    times[name].append((time.perf_counter() - t0) * 1e6)
        where = f"PostgreSQL {args.database_url}" if args.database_url else "SQLite"
        print(f"egress store on {where}, {args.repeat} calls each, {args.rows} rows an output")
        for name, values in times.items():
            q = statistics.quantiles(values, n=10)
            print(f"  {name:9s} median {statistics.median(values):7.1f} us   p90 {q[-1]:7.1f} us")
        store.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
