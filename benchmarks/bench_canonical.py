"""The airlock's canonical re-encoding and checks of a 10 MB table, released as CSV and as XLSX, against a
plain parse and re-write of the same file with pandas, all measured in the same run.

    /opt/paitient/venv/bin/python benchmarks/bench_canonical.py [--mb 10] [--repeat 5] [--format both|csv|xlsx]

Builds a CSV of about ``--mb`` megabytes (a stratified summary: text strata, counts, means with full
precision) and then, in turns:

- ``airlock csv`` / ``airlock xlsx``: what a request of kind ``table`` costs the service:
  :func:`canonical_output` (parse into typed cells, normalise, re-write as CSV, or as XLSX with the same
  cells as CSV beside it) and the automatic checks of the stored form (:func:`run_checks`: published copy,
  row level, labels, patient rows by content, minimum count, zeros, dominance, differencing), as
  :meth:`Airlock.check` runs them, with a project's context: a catalogue of the table's categories, the
  exact-data-match index of a 300,000-row patient table (``bench_egress.make_table``, built before the
  timing, as at publication) and an earlier release of the same strata to difference with;
- ``pandas``: ``pd.read_csv`` of the same bytes and ``to_csv`` of the frame (the floor of any re-encoding that
  parses the table);
- the two writers alone, from the same canonical frame: ``frame_csv`` and ``frame_xlsx``.

Prints the median of each in seconds and the ratios: each release against pandas, XLSX against CSV (release
and writer). Goal (issue 14): canonicalising and checking a 10 MB table in at most 2 s, in either form.
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

sys.path.insert(0, str(REPO / "benchmarks"))
from bench_egress import make_table  # noqa: E402

from paitient.rules import differencing, disclosure  # noqa: E402
from paitient.rules.edm import EDMIndex, Scan  # noqa: E402
from paitient.services.airlock.canonical import (  # noqa: E402
    canonical_frame,
    canonical_output,
    frame_csv,
    frame_xlsx,
    read_frame,
)
from paitient.services.airlock.checks import CheckContext, run_checks  # noqa: E402
from paitient.services.airlock.store import Request  # noqa: E402

SITES = [f"site-{i:03d}" for i in range(150)]
STAGES = ["I", "II", "III", "IV"]


def table(megabytes: float) -> bytes:
    rng = np.random.default_rng(0)
    rows = int(megabytes * 1e6 / 57)  # about 57 bytes a row
    df = pd.DataFrame(
        {
            "site": rng.choice(SITES, rows),
            "stage": rng.choice(STAGES, rows),
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


def context(patient_rows: int = 300_000) -> CheckContext:
    """What the airlock gives the checks for a project: its catalogue's labels, its datasets' row index, and
    its earlier releases (one: patients by site and stage)."""
    labels = disclosure.Labels.of([*SITES, *STAGES, "site", "stage", "patients", "events", "mean_age", "mean_bmi"])
    index = EDMIndex.build(make_table(patient_rows), key=bytes(32), primary_columns=["patient"])
    rng = np.random.default_rng(1)
    earlier = differencing.from_frame(
        pd.DataFrame(
            {
                "site": np.repeat(SITES, len(STAGES)),
                "stage": STAGES * len(SITES),
                "patients": rng.integers(10, 5000, len(SITES) * len(STAGES)),
            }
        ),
        ["patients"],
        ["site", "stage"],
    )
    return CheckContext(
        labels=lambda project: labels,
        reveal=lambda project, text: {f"{project}/cohort": len(Scan(text).rows(index))},
        stage_table=lambda rid, project, t: None,
        earlier_tables=lambda project, rid: [("earlier", earlier, True)],
    )


def airlock(data: bytes, table_format: str, ctx: CheckContext) -> tuple[float, list[str]]:
    start = time.perf_counter()
    out = canonical_output("table", "table.csv", data, table_format=table_format)
    checked = out.cells or out.data
    results = run_checks(request(out.sha256, len(out.data)), checked, ctx)
    return time.perf_counter() - start, [f"{r['check']}={r['status']}" for r in results]


def plain(data: bytes) -> float:
    start = time.perf_counter()
    pd.read_csv(io.BytesIO(data)).to_csv(io.StringIO(), index=False)
    return time.perf_counter() - start


def writers(data: bytes) -> tuple[float, float]:
    """The CSV and the XLSX writer alone, from the same canonical frame."""
    frame = canonical_frame(read_frame(data, "table.csv"))
    start = time.perf_counter()
    frame_csv(frame)
    middle = time.perf_counter()
    frame_xlsx(frame)
    return middle - start, time.perf_counter() - middle


GOAL_S = 2.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=10.0, help="size of the table in megabytes (default 10)")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each (default 5)")
    ap.add_argument(
        "--format", choices=["both", "csv", "xlsx"], default="both", help="what the table is released as (default both)"
    )
    args = ap.parse_args()
    formats = ["csv", "xlsx"] if args.format == "both" else [args.format]
    data = table(args.mb)
    ctx = context()
    runs: dict[str, list[float]] = {"pandas": [], "csv writer": [], "xlsx writer": []} | {f: [] for f in formats}
    checks: list[str] = []
    for _ in range(args.repeat):
        runs["pandas"].append(plain(data))
        for f in formats:
            took, checks = airlock(data, f, ctx)
            runs[f].append(took)
        csv_alone, xlsx_alone = writers(data)
        runs["csv writer"].append(csv_alone)
        runs["xlsx writer"].append(xlsx_alone)
    med = {k: statistics.median(v) for k, v in runs.items()}
    rows = data.count(b"\n") - 1
    print(f"table: {len(data) / 1e6:.1f} MB, {rows} rows; {args.repeat} runs of each, medians")
    print(f"checks: {', '.join(checks)}")
    print(f"pandas read_csv + to_csv (baseline): {med['pandas']:.3f} s")
    for f in formats:
        met = "met" if med[f] <= GOAL_S else "NOT met"
        print(
            f"airlock, released as {f:4s} (canonical + checks): {med[f]:.3f} s = "
            f"{med[f] / med['pandas']:.2f} x pandas; goal <= {GOAL_S:g} s: {met}"
        )
    if len(formats) == 2:
        print(
            f"ratio xlsx / csv release: {med['xlsx'] / med['csv']:.2f} "
            f"(the xlsx release adds {med['xlsx'] - med['csv']:.3f} s)"
        )
    print(
        f"writers alone: csv {med['csv writer']:.3f} s, xlsx {med['xlsx writer']:.3f} s; "
        f"ratio xlsx / csv writer: {med['xlsx writer'] / med['csv writer']:.2f}"
    )


if __name__ == "__main__":
    main()
