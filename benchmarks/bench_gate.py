"""The egress gate's overhead on one output: the user's server asking the egress service, against a plain
round trip of the same bytes over a unix socket.

    /opt/paitient/venv/bin/python benchmarks/bench_gate.py [--repeat 300]
        [--database-url postgresql://USER@/DB?host=/run/postgresql --passfile FILE]

Sets up, in a temporary state directory, the demo data published with its row indexes (the real ingest)
and the egress service on its real socket with the real matcher, in a process of its own as in a running
workspace (its counts in SQLite under the state directory, or with ``--database-url`` in that PostgreSQL
database's schema ``egress``, as a site's ``[database] url`` puts them); then, alternately:

- ``gate``: :meth:`paitient.server.gate.EgressGate.check_blocking` of a 10 KB kernel message (a stream
  message as JSON, the text of a typical cell: a head() table, a few lines of a training log);
- ``echo``: the same 10 KB sent to a unix-socket echo server and read back (the floor any out-of-process
  check pays);
- ``dump``: the gate on a 10 KB piece of a dataset dump (withheld: the slow path, with rows).

Prints the median and p90 of each in ms and the ratio of gate to echo. Goal (issue 12): the gate's overhead
on a 10 KB output at most 1 ms median. Run as root (the service identifies its caller through the registry).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "extensions"))

from paitient.config import load  # noqa: E402
from paitient.ops.demodata import publish_demo  # noqa: E402
from paitient.registry import Member, Registry  # noqa: E402
from paitient.server.gate import EgressGate  # noqa: E402
from paitient.services.egress import socket_path  # noqa: E402
from paitient.services.egress.matcher import Matcher  # noqa: E402
from paitient.services.egress.service import EgressServer, EgressService  # noqa: E402
from paitient.services.egress.store import EgressStore  # noqa: E402
from tests.groups import made_groups_removed  # noqa: E402

TEN_KB = 10_000


def ordinary_output(df) -> bytes:
    """About 10 KB of what a cell prints: a head(), a describe() excerpt and a training log."""
    lines = [df.head().to_string(), df.iloc[:, 4:9].describe().to_string()]
    lines += [f"epoch {e:3d}  loss {1 / (e + 1.37):.4f}  accuracy {0.5 + e / 400:.3f}" for e in range(200)]
    text = "\n".join(lines)[:TEN_KB]
    return json.dumps({"name": "stdout", "text": text}).encode()


def dump_output(df) -> bytes:
    return json.dumps({"name": "stdout", "text": df.to_csv()[:TEN_KB]}).encode()


class CallerIsBench(Registry):
    """The gate runs in this process, as root, which no member may be: the service takes it for a researcher."""

    bench = Member("bench", "pt-bench", 30999, ("oncology",), ("researcher",))

    def by_uid(self, uid: int) -> Member | None:
        return self.bench if uid == os.getuid() else None


def serve(site, ready) -> None:
    """The egress service, as its own process runs it (the real matcher, store and socket)."""
    service = EgressService(
        site, EgressStore.for_site(site), Matcher(site), CallerIsBench.for_state_dir(site.state_dir)
    )
    server = EgressServer(socket_path(site), service)
    ready.set()
    server.serve_forever()


class Echo(threading.Thread):
    """A unix-socket server that sends back what it gets, framed by a 4-byte length."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)

    def run(self) -> None:
        conn, _ = self.sock.accept()
        while True:
            head = conn.recv(4, socket.MSG_WAITALL)
            if len(head) < 4:
                return
            n = int.from_bytes(head, "big")
            data = conn.recv(n, socket.MSG_WAITALL)
            conn.sendall(head + data)


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=300)
    ap.add_argument("--database-url", default="", help="a PostgreSQL [database] url for the counts (default: SQLite)")
    ap.add_argument("--passfile", default="", help="[database] passfile for --database-url")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the egress service knows its callers by uid from the root-owned registry")
    logging.basicConfig(level=logging.WARNING)
    base = Path(tempfile.mkdtemp(prefix="bench-gate-", dir="/tmp"))
    try:
        database = {"url": args.database_url, "passfile": args.passfile} if args.database_url else {}
        site = load(None, overrides={"workspace": {"state_dir": str(base / "state")}, "database": database})
        publish_demo(site)
        ready = multiprocessing.get_context("fork").Event()
        egress = multiprocessing.get_context("fork").Process(target=serve, args=(site, ready), daemon=True)
        egress.start()
        if not ready.wait(60):
            sys.exit("the egress service did not start")
        gate = EgressGate(
            str(socket_path(site)),
            fail_closed_bytes=site.egress.fail_closed_bytes,
            unchecked_bytes=site.egress.unchecked_bytes,
        )

        import pyarrow.parquet as pq

        df = pq.read_table(site.data_root / "oncology" / "breast_cancer" / "current" / "data.parquet").to_pandas()
        ordinary, dump = ordinary_output(df), dump_output(df)
        echo_path = base / "echo.sock"
        Echo(echo_path).start()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(echo_path))

        def echo() -> None:
            client.sendall(len(ordinary).to_bytes(4, "big") + ordinary)
            client.recv(4 + len(ordinary), socket.MSG_WAITALL)

        n = [0]

        def check(text: bytes) -> bool:
            n[0] += 1
            return gate.check_blocking(
                context=f"kernel:bench:{n[0]}", channel="kernel", object="bench", text=text, final=True
            ).forward

        assert check(ordinary), "the ordinary output was withheld"
        assert not check(dump), "the dump passed"
        results: dict[str, list[float]] = {"gate": [], "echo": [], "dump": []}
        for _ in range(args.repeat // 10):  # alternate, so drift hits both
            results["echo"] += timed(echo, 10)
            results["gate"] += timed(lambda: check(ordinary), 10)
            results["dump"] += timed(lambda: check(dump), 10)
        counts = "PostgreSQL" if args.database_url else "SQLite"
        print(
            f"10 KB output ({len(ordinary):,} bytes as JSON), {args.repeat} runs each, counts in {counts}, "
            f"load {os.getloadavg()[0]:.1f}"
        )
        for name, values in results.items():
            q = statistics.quantiles(values, n=10)
            print(f"  {name:5s} median {statistics.median(values):6.3f} ms   p90 {q[-1]:6.3f} ms")
        ratio = statistics.median(results["gate"]) / statistics.median(results["echo"])
        print(f"  gate / echo: {ratio:.1f}x   (goal: gate median <= 1 ms)")
        gate.shutdown()
        egress.terminate()
        egress.join(10)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    with made_groups_removed(workspace=True):  # the groups its publications made
        main()
