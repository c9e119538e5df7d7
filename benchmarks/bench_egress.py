"""Row detection (exact data match) on one core: scanning, index build, index size, a small output's cost.

    /opt/paitient/venv/bin/python benchmarks/bench_egress.py [--rows 1000000] [--dump-rows 40000] [--repeat 5]

The table is shaped like the demo data, at scale: a pseudonym per patient (3 rows each), a shifted date,
a postcode prefix, an age band, 12 measurements printed with 4 significant digits (as the breast
cancer features), 4 derived values at full float precision (as standardised lab values), 2 integer
counts and a 0/1 target. Figures, each against a baseline measured in the same run, alternately:

- scanning MB/s of (a) a dataset dump (``to_csv`` of ``--dump-rows`` rows of the table) and (b) ordinary
  notebook output (head(), describe(), a training log, a model summary, value counts, arrays, warnings),
  against the index of the whole table; baselines: ``bytes.splitlines()`` and a ``re.findall`` of numbers;
- index build rows/s at publication, against a plain Parquet read of the same table;
- index bytes per indexed value;
- the cost of scanning a 10 KB output (median ms), ordinary and a dump's.

Goals (issue 12): scanning >= 50 MB/s, build >= 500k rows/s, <= 16 bytes per value, 10 KB well under 1 ms.
One core: the process is pinned to one CPU, Arrow's pools and the BLAS/OpenMP pools get one thread each.
CPU time decides (the machine is shared); wall time is shown too.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402 - the thread settings above must come first
import io  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from paitient.rules.edm import EDMIndex, Scan  # noqa: E402

_NUMBERS = re.compile(rb"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?")
_B32 = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", dtype=np.uint8)


def make_table(rows: int, seed: int = 7) -> pa.Table:
    rng = np.random.default_rng(seed)
    patients = max(1, rows // 3)
    codes = rng.integers(0, 32, size=(patients, 16))
    names = np.char.add("P-", _B32[codes].view("S16").ravel().astype(str))
    patient = np.sort(rng.integers(0, patients, rows))
    cols: dict[str, pa.Array] = {
        "patient": pa.array(names[patient]).dictionary_encode(),
        "postcode": pa.array(rng.choice(["10", "12", "13", "14"], rows)).dictionary_encode(),
        "diagnosis_date": pa.array(rng.integers(9_000, 19_000, rows).astype(np.int32), pa.int32()).cast(pa.date32()),
        "age": pa.array(rng.choice(["0-39", "40-49", "50-59", "60-69", "70-79", "80+"], rows)).dictionary_encode(),
    }
    scales = (14.0, 19.0, 92.0, 655.0, 0.096, 0.104, 0.089, 0.049, 0.18, 0.063, 0.41, 1.2)
    for j, s in enumerate(scales):  # 4 significant digits, as the breast cancer features print
        x = np.abs(rng.normal(s, s / 4, rows)) + s / 100
        lead = np.floor(np.log10(x))
        cols[f"feature_{j}"] = pa.array(np.round(x / 10 ** (lead - 3)) * 10 ** (lead - 3))
    for j in range(4):
        cols[f"derived_{j}"] = pa.array(rng.normal(0, 1, rows))
    cols["nodes"] = pa.array(rng.poisson(3, rows))
    cols["time"] = pa.array(rng.integers(30, 3000, rows))
    cols["target"] = pa.array(rng.integers(0, 2, rows))
    return pa.table(cols)


def ordinary_output(table: pa.Table, size: int, seed: int = 3) -> bytes:
    """Notebook output of the everyday kind, repeated to ``size`` bytes: nothing of it is a row dump."""
    rng = np.random.default_rng(seed)
    df = table.slice(0, 2000).to_pandas()
    num = df.select_dtypes("number")
    parts = [
        repr(df.head()),
        repr(num.describe()),
        repr(df["age"].value_counts()),
        repr(num.groupby(df["age"], observed=True).mean()),
        repr(num.iloc[:, :8].corr()),
        "\n".join(
            f"epoch {i:4d}  loss {0.69 * np.exp(-i / 300) + rng.normal(0, 0.01):.4f}  "
            f"acc {0.5 + 0.45 * (1 - np.exp(-i / 200)):.4f}  val_loss {0.7 * np.exp(-i / 280):.4f}"
            for i in range(300)
        ),
        "Layer (type)          Output Shape     Param #\n"
        + "\n".join(f"Linear-{i}           [-1, {64 * (i + 1)}]     {64 * (i + 1) * 30 + 64:,}" for i in range(6)),
        repr(rng.random(200)),
        "UserWarning: the default value of numeric_only changed; see https://pandas.pydata.org/docs/\n",
        "accuracy 0.9123  precision 0.8876  recall 0.9345  f1 0.9105  auc 0.9567\n",
    ]
    block = ("\n".join(parts) + "\n").encode()
    return (block * (size // len(block) + 1))[:size]


def measure(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median (wall s, cpu s) of ``repeat`` runs."""
    walls, cpus = [], []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def row(label: str, size: float, unit: str, wall: float, cpu: float) -> None:
    print(f"  {label:34s} {wall * 1e3:9.1f} {size / wall:10.1f} {cpu * 1e3:9.1f} {size / cpu:10.1f}  {unit}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the indexed table")
    ap.add_argument("--dump-rows", type=int, default=40_000, help="rows of the dump that is scanned")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    key = os.urandom(32)
    work = Path(tempfile.mkdtemp(prefix="paitient-bench-"))
    try:
        table = make_table(args.rows)
        src = work / "data.parquet"
        pq.write_table(table, src)
        print(f"table: {args.rows:,} rows x {table.num_columns} columns (one core, median of {args.repeat})")
        print(f"  {'':34s} {'wall ms':>9s} {'per s':>10s} {'cpu ms':>9s} {'per s':>10s}")

        print("index build at publication (rows/s):")
        index = EDMIndex.build(table, key=key, primary_columns=["patient"])
        floor = measure(lambda: pq.read_table(src), args.repeat)
        build = measure(lambda: EDMIndex.build(pq.read_table(src), key=key, primary_columns=["patient"]), args.repeat)
        row("baseline: parquet read", args.rows, "rows/s", *floor)
        row("read + index build", args.rows, "rows/s", *build)
        print(f"  cpu time of read + build / parquet read: {build[1] / floor[1]:.1f}x")
        h = index.header
        print(
            f"  {h['cells']:,} cells indexed in {h['entries']:,} entries (threshold {h['threshold']} rows, tiers "
            f"{h['tiers']}), {index.nbytes / 1e6:.1f} MB: {index.bytes_per_cell:.1f} bytes per indexed value "
            f"({index.bytes_per_entry:.1f} per entry)"
        )

        buf = io.StringIO()
        table.slice(0, args.dump_rows).to_pandas().to_csv(buf)
        dump = buf.getvalue().encode()
        ordinary = ordinary_output(table, len(dump))
        indexes = {"table": index}
        rates = {}
        for name, text in (("dataset dump", dump), ("ordinary output", ordinary)):
            mb = len(text) / 1e6
            revealed = len(Scan(text).rows(index))
            print(f"scanning {name}: {mb:.1f} MB, reveals {revealed:,} rows (MB/s):")
            lines = measure(text.splitlines, args.repeat)
            regex = measure(lambda t=text: _NUMBERS.findall(t), args.repeat)
            scan = measure(lambda t=text: [Scan(t).rows(ix) for ix in indexes.values()], args.repeat)
            row("baseline: bytes.splitlines()", mb, "MB/s", *lines)
            row("baseline: re.findall(numbers)", mb, "MB/s", *regex)
            row("row detection", mb, "MB/s", *scan)
            print(
                f"  cpu time of detection / re.findall: {scan[1] / regex[1]:.2f}x, / splitlines: "
                f"{scan[1] / lines[1]:.0f}x"
            )
            rates[name] = mb / scan[1]

        print("a 10 KB output (ms, median of 200):")
        for name, text in (("ordinary", ordinary), ("dump", dump)):
            chunk = text[:10_000]
            times = []
            for _ in range(200):
                c = time.perf_counter()
                Scan(chunk).rows(index)
                times.append(time.perf_counter() - c)
            print(f"  {name:34s} {statistics.median(times) * 1e3:9.3f} ms (p90 {np.percentile(times, 90) * 1e3:.3f})")

        rps = args.rows / build[1]
        print(
            f"goals on cpu time: scan >= 50 MB/s: dump {rates['dataset dump']:.0f}, ordinary "
            f"{rates['ordinary output']:.0f}; build >= 500k rows/s: {rps / 1e3:.0f}k; "
            f"<= 16 bytes/value: {index.bytes_per_cell:.1f} (load average {os.getloadavg()[0]:.1f} "
            f"on {os.cpu_count()} CPUs)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
