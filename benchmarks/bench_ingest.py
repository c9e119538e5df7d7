"""Ingest throughput on one core, against the floor of a plain Parquet read + write of the same table.

    /opt/paitient/venv/bin/python benchmarks/bench_ingest.py [--rows 1000000] [--repeat 3]

The table is a generated encounter extract: 3 identifier columns (patient id, case id, name), 2 dates
(admission, discharge), 5 others (age, sex, diagnosis code, lab value, postcode). Patients have ~10
encounters and cases ~4 rows, as in clinical data. The ingest is the whole thing `paitient ingest` does:
key check, source checksum, read, strict identifier checks, pseudonyms, date shifts, generalisation,
k-anonymity, Parquet + manifest write with fsync, atomic publication and the audit record.
Goal (issue 4): >= 1M rows/s and <= 2x the floor.

One core: the process is pinned to one CPU, Arrow's CPU and I/O pools have one thread each and the
OpenMP/BLAS pools too (set before numpy loads); floor and ingest run alternately in the same process,
so both see the same settings and the same background load. Wall and CPU time are both reported.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402 - the thread settings above must come first
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from paitient import config  # noqa: E402
from paitient.services.data import keys  # noqa: E402
from paitient.services.data.ingest import ingest  # noqa: E402
from paitient.services.data.spec import parse_spec  # noqa: E402


def make_table(rows: int, seed: int = 1) -> pa.Table:
    rng = np.random.default_rng(seed)
    patients = max(1, rows // 10)
    cases = max(1, rows // 4)
    case = np.sort(rng.integers(0, cases, rows))
    patient = (case * 7919) % patients  # a case belongs to one patient
    names = np.array([f"Name{i} Surname{i % 997}" for i in range(patients)], dtype=object)
    admission = rng.integers(16_000, 20_000, rows).astype(np.int32)
    return pa.table(
        {
            "patient_id": pa.array([f"{p:09d}" for p in patient]),
            "case_id": pa.array([f"C{c:010d}" for c in case]),
            "name": pa.array(names[patient]),
            "admission": pa.array(admission, pa.int32()).cast(pa.date32()),
            "discharge": pa.array(admission + rng.integers(0, 30, rows).astype(np.int32), pa.int32()).cast(pa.date32()),
            "age": pa.array(rng.integers(18, 95, rows)),
            "sex": pa.array(rng.choice(["F", "M"], rows)),
            "diagnosis": pa.array(np.char.add("I", (rng.zipf(1.6, rows) % 900 + 100).astype(str))),
            "lab_value": pa.array(rng.normal(5.0, 1.5, rows)),
            "postcode": pa.array(
                np.char.add(rng.choice(["10", "12", "13", "14", "20"], rows), rng.integers(100, 999, rows).astype(str))
            ),
        }
    )


SPEC = {
    "project": "bench",
    "dataset": "encounters",
    "patient_id": "patient_id",
    "quasi_identifiers": ["age", "sex", "postcode"],
    "columns": {
        "patient_id": "pseudonym",
        "case_id": {"action": "pseudonym", "domain": "case", "prefix": "C-"},
        "name": "drop",
        "admission": "date_shift",
        "discharge": "date_shift",
        "age": {"action": "generalise", "method": "age_band", "width": 10, "top": 90},
        "sex": "keep",
        "diagnosis": {"action": "generalise", "method": "rare", "min_count": 20},
        "lab_value": "keep",
        "postcode": {"action": "generalise", "method": "prefix", "length": 2},
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    work = Path(tempfile.mkdtemp(prefix="paitient-bench-"))
    try:
        table = make_table(args.rows)
        src = work / "source.parquet"
        pq.write_table(table, src)
        site = config.parse(
            {
                "workspace": {"state_dir": str(work / "state")},
                "projects": [{"name": "bench", "group": "bench", "datasets": ["encounters"]}],
            }
        )
        keys.ensure_key(site)
        spec = parse_spec(SPEC, work, source=src)
        floor: list[tuple[float, float]] = []
        full: list[tuple[float, float]] = []
        for i in range(args.repeat):  # interleaved, so load from other processes hits both alike
            w, c = time.perf_counter(), time.process_time()
            pq.write_table(pq.read_table(src), work / f"copy{i}.parquet")
            floor.append((time.perf_counter() - w, time.process_time() - c))
            w, c = time.perf_counter(), time.process_time()
            published = ingest(site, spec, operator="bench")
            full.append((time.perf_counter() - w, time.process_time() - c))
        m = published.manifest
        print(
            f"rows {args.rows:,}  patients {m['patients']:,}  cases {args.rows // 4:,}  k {m['k']}  "
            f"(one core, median of {args.repeat})"
        )
        print(f"{'':28s} {'wall s':>8s} {'M rows/s':>9s} {'cpu s':>8s} {'M rows/s':>9s}")
        for label, runs in (("floor: parquet read+write", floor), ("ingest: full pipeline", full)):
            w, c = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            print(f"{label:28s} {w:8.3f} {args.rows / w / 1e6:9.2f} {c:8.3f} {args.rows / c / 1e6:9.2f}")
        rw = statistics.median(b[0] / a[0] for a, b in zip(floor, full, strict=True))
        rc = statistics.median(b[1] / a[1] for a, b in zip(floor, full, strict=True))
        print(f"ratio ingest / floor: wall {rw:.2f}x, cpu {rc:.2f}x   (goal: >= 1M rows/s and <= 2x)")
        w, c = statistics.median(r[0] for r in full), statistics.median(r[1] for r in full)
        verdict = {
            k: "met" if args.rows / t >= 1e6 and r <= 2 else "NOT met" for k, t, r in (("cpu", c, rc), ("wall", w, rw))
        }
        load = os.getloadavg()[0]
        print(
            f"goal on cpu time: {verdict['cpu']}; on wall time: {verdict['wall']} "
            f"(load average {load:.1f} on {os.cpu_count()} CPUs: other work slows wall time)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
