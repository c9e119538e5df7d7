"""The airlock's check before a request, as a notebook sees it: ``airlock.check`` of a 1,000-cell table.

    /opt/paitient/venv/bin/python benchmarks/bench_feedback.py [--rows 100] [--columns 10] [--repeat 30]

Runs as root: the airlock's socket, its check worker and a project with a published, indexed dataset (the
breast cancer data, so the patient-row check scans the table against a real index) in a temporary state
folder; the benchmark process is the researcher (uid 0 registered as a member, as the tests do).

The table: ``--rows`` age bands x ``--columns`` count columns (1,000 cells by default), a few of them below
the minimum count, so the answer names failed cells. Timed, alternately, in the same run:

- ``check``: ``airlock.check(df)`` from the kernel API, from the DataFrame to the rendered notebook display:
  the CSV written to a temporary file, the socket round trip with the re-encoding and every check, the kernel's
  reading of its own table and ``_repr_html_``;
- baseline ``status``: ``airlock.status(rid)`` of a request of the same table filed earlier (a socket round
  trip that returns the same checks, already computed).

Prints the median and 90th percentile of each in ms and the ratio of the medians. Goal (issue 14): check
<= 300 ms for a 1,000-cell table.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "extensions"))

GOAL_MS = 300.0


def make_table(rows: int, columns: int, seed: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    counts = rng.integers(10, 400, size=(rows, columns))
    counts[rng.integers(0, rows, 3), rng.integers(0, columns, 3)] = [3, 7, 0]  # cells that fail
    frame = pd.DataFrame(counts, columns=[f"n {j}" for j in range(columns)])
    frame.insert(0, "band", [f"{i}-{i + 1}" for i in range(rows)])  # bins written as text: labels
    return frame


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--columns", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the airlock's socket and store are root's (see the module docstring)")
    logging.basicConfig(level=logging.WARNING)

    from paitient.config import parse
    from paitient.kernel import airlock
    from paitient.registry import Member, Registry
    from paitient.services.airlock.service import Airlock, AirlockSettings
    from paitient.services.kit.channel import ChannelServer
    from tests import rootmember
    from tests.airlock.helpers import breast_cancer, publish_indexed

    with tempfile.TemporaryDirectory(prefix="paitient-bench-feedback-") as tmp:
        state = Path(tmp) / "state"
        state.mkdir(mode=0o755)
        site = parse(
            {
                "workspace": {"state_dir": str(state)},
                "projects": [
                    {"name": "oncology", "group": "oncology", "datasets": ["breast_cancer"], "stewards": ["sam"]}
                ],
            }
        )
        publish_indexed(site, "oncology", "breast_cancer", breast_cancer())
        rootmember.put(
            Registry.for_state_dir(site.state_dir), Member("alice", "root", 0, ("oncology",), ("researcher",))
        )
        os.environ["PAITIENT_RUN_DIR"] = str(site.run_dir)
        service = Airlock(site, settings=AirlockSettings())
        service.start()
        server = ChannelServer(site.run_dir / "airlock.sock", service.handlers(), name="airlock")
        server.start_in_thread()
        try:
            table = make_table(args.rows, args.columns)
            cells = table.shape[0] * (table.shape[1] - 1)
            first = airlock.check(table, name="bands.csv")  # warms the row index and the catalogue
            first._repr_html_()
            rid = airlock.request(table, kind="table", justification="bench", name="bands.csv", confirm=True)
            service.wait_idle()
            check_ms: list[float] = []
            status_ms: list[float] = []
            for i in range(args.repeat):
                runs = [
                    (check_ms, lambda: airlock.check(table, name="bands.csv")._repr_html_()),
                    (status_ms, lambda: airlock.status(rid)),
                ]
                for out, fn in runs if i % 2 == 0 else reversed(runs):
                    out.append(timed(fn))
        finally:
            server.shutdown()
            server.server_close()
            service.stop()

    def summary(values: list[float]) -> str:
        p90 = statistics.quantiles(values, n=10)[-1] if len(values) >= 2 else values[0]
        return f"median {statistics.median(values):7.1f} ms, p90 {p90:7.1f} ms"

    check_median, status_median = statistics.median(check_ms), statistics.median(status_ms)
    print(f"table: {args.rows} rows x {args.columns} count columns = {cells} cells; {args.repeat} runs each")
    print(f"  failed checks: {', '.join(first.failed) or 'none'}; failed cells named: {len(first.cells)}")
    print(f"  airlock.check(df) + display : {summary(check_ms)}")
    print(f"  airlock.status(rid) baseline: {summary(status_ms)}")
    print(f"  ratio check / status (medians): {check_median / status_median:.1f}x")
    verdict = "meets" if check_median <= GOAL_MS else "MISSES"
    print(f"  goal: check <= {GOAL_MS:.0f} ms for 1,000 cells: {verdict} ({check_median:.1f} ms)")


if __name__ == "__main__":
    main()
