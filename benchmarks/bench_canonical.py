"""The airlock's canonical re-encoding and checks of a 10 MB table, against a plain parse and re-write of the
same file with pandas.

    /opt/paitient/venv/bin/python benchmarks/bench_canonical.py [--mb 10] [--repeat 5] [--format csv|xlsx]

Builds a CSV of about ``--mb`` megabytes (a stratified summary: text strata, counts, means with full
precision) and then, alternately:

- ``airlock``: what a request of kind ``table`` costs the service: :func:`canonical_output` (parse into typed
  cells, normalise, re-write) and the automatic checks of the stored form (:func:`run_checks`: published copy,
  row level, minimum count, zeros, dominance), as :meth:`Airlock.check` runs them;
- ``pandas``: ``pd.read_csv`` of the same bytes and ``to_csv`` of the frame (the floor of any re-encoding that
  parses the table).

Prints the median of each in seconds and the ratio airlock / pandas. Goal (issue 14): canonicalising and
checking a 10 MB table in at most 2 s.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "extensions"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from paitient.services.airlock.canonical import canonical_output  # noqa: E402
from paitient.services.airlock.checks import CheckContext, run_checks  # noqa: E402
from paitient.services.airlock.store import Request  # noqa: E402


def table(megabytes: float) -> bytes:
    rng = np.random.default_rng(0)
    rows = int(megabytes * 1e6 / 57)  # about 57 bytes a row
    df = pd.DataFrame(
        {
            "site": rng.choice([f"site-{i:03d}" for i in range(150)], rows),
            "stage": rng.choice(["I", "II", "III", "IV"], rows),
            "patients": rng.integers(10, 5000, rows),
            "events": rng.integers(10, 900, rows),
            "mean_age": rng.normal(61, 9, rows),
            "mean_bmi": rng.normal(27, 4, rows),
        }
    )
    return df.to_csv(index=False).encode()


def request(sha256: str, size: int) -> Request:
    return Request(
        id="bench",
        project="p",
        username="u",
        account="pt-u",
        uid=1,
        kind="table",
        filename="table.csv",
        sha256=sha256,
        size=size,
        justification="benchmark",
        meta={},
        state="checking",
        created=0.0,
        updated=0.0,
    )


def airlock(data: bytes, table_format: str) -> tuple[float, list[str]]:
    start = time.perf_counter()
    out = canonical_output("table", "table.csv", data, table_format=table_format)
    checked = out.cells or out.data
    results = run_checks(request(out.sha256, len(out.data)), checked, CheckContext())
    return time.perf_counter() - start, [f"{r['check']}={r['status']}" for r in results]


def plain(data: bytes) -> float:
    start = time.perf_counter()
    pd.read_csv(io.BytesIO(data)).to_csv(io.StringIO(), index=False)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=10.0, help="size of the table in megabytes (default 10)")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each (default 5)")
    ap.add_argument("--format", choices=["csv", "xlsx"], default="csv", help="what the table is released as")
    args = ap.parse_args()
    data = table(args.mb)
    ours, base, checks = [], [], []
    for _ in range(args.repeat):
        took, checks = airlock(data, args.format)
        ours.append(took)
        base.append(plain(data))
    a, b = statistics.median(ours), statistics.median(base)
    rows = data.count(b"\n") - 1
    print(f"table: {len(data) / 1e6:.1f} MB, {rows} rows; released as {args.format}")
    print(f"checks: {', '.join(checks)}")
    print(f"airlock (canonical + checks): median {a:.3f} s over {args.repeat} runs")
    print(f"pandas read_csv + to_csv:     median {b:.3f} s")
    print(f"ratio airlock / pandas: {a / b:.2f}; goal: airlock <= 2 s: {'met' if a <= 2.0 else 'NOT met'}")


if __name__ == "__main__":
    main()
