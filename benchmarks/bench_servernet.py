"""What the server's network namespace costs: the same echo server reached directly and through
:mod:`paitient.hub.servernet` (the root wrapper that puts each user's server in a namespace of its own).

    /opt/paitient/venv/bin/python benchmarks/bench_servernet.py [--repeat 400]

Two echo servers run as ``nobody``: one on a host port, one started by the wrapper in its namespace. For
each, alternately:

- ``connect``: a new TCP connection, 1 KB there and back, closed (what a proxied HTTP request pays);
- ``ping``: 1 KB there and back on an open connection (a websocket message and its answer);
- ``bulk``: 32 MB through an open connection and back (a large download), as MB/s.

Prints medians, the wrapped/direct ratios, and the resident memory of the wrapper against the echo server
it fronts. Run as root (the wrapper makes a network namespace and drops to the account).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "extensions"))

from jupyterhub.utils import random_port  # noqa: E402

from paitient.hub.spawner import server_command  # noqa: E402

ECHO = textwrap.dedent(
    """
    import socket, sys, threading
    srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    print("ready", flush=True)
    def echo(c):
        with c:
            while data := c.recv(1 << 20):
                c.sendall(data)
    while True:
        c, _ = srv.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()
    """
)


def recv_exactly(s: socket.socket, n: int) -> None:
    got = 0
    while got < n:
        chunk = s.recv(min(1 << 20, n - got))
        if not chunk:
            raise ConnectionError("closed early")
        got += len(chunk)


def connect_once(port: int, payload: bytes) -> float:
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(payload)
        recv_exactly(s, len(payload))
    return time.perf_counter() - t


def ping(s: socket.socket, payload: bytes) -> float:
    t = time.perf_counter()
    s.sendall(payload)
    recv_exactly(s, len(payload))
    return time.perf_counter() - t


def bulk(port: int, size: int) -> float:
    import threading

    block = b"x" * (1 << 20)
    with socket.create_connection(("127.0.0.1", port)) as s:
        t = time.perf_counter()
        sender = threading.Thread(target=lambda: [s.sendall(block) for _ in range(size // len(block))])
        sender.start()
        recv_exactly(s, size)
        sender.join()
        return size / (time.perf_counter() - t) / 1e6


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def start(argv: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=400)
    args = parser.parse_args()

    direct_port, wrapped_port = random_port(), random_port()
    echo = [sys.executable, "-I", "-c", ECHO]
    direct = start(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *echo, str(direct_port)])
    hub_api = f"http://127.0.0.1:{random_port()}/hub/api"
    wrapped = start(server_command("nobody", [], ("127.0.0.1", wrapped_port), hub_api, [*echo, str(wrapped_port)]))
    try:
        payload = b"p" * 1024
        times: dict[str, dict[str, list[float]]] = {"direct": {}, "wrapped": {}}
        conns = {
            "direct": socket.create_connection(("127.0.0.1", direct_port)),
            "wrapped": socket.create_connection(("127.0.0.1", wrapped_port)),
        }
        ports = {"direct": direct_port, "wrapped": wrapped_port}
        for _ in range(args.repeat):
            for name in ("direct", "wrapped"):
                times[name].setdefault("connect", []).append(connect_once(ports[name], payload))
                times[name].setdefault("ping", []).append(ping(conns[name], payload))
        rates = {name: statistics.median(bulk(ports[name], 32 << 20) for _ in range(5)) for name in ports}
        for s in conns.values():
            s.close()

        print(f"servernet: {args.repeat} rounds, medians (ms); wrapped = through the namespace's forwarder")
        for what in ("connect", "ping"):
            d = statistics.median(times["direct"][what]) * 1e3
            w = statistics.median(times["wrapped"][what]) * 1e3
            print(f"  {what:<8} direct {d:6.3f}  wrapped {w:6.3f}  ratio {w / d:5.2f}  (+{w - d:.3f} ms)")
        d, w = rates["direct"], rates["wrapped"]
        print(f"  bulk     direct {d:6.0f} MB/s  wrapped {w:6.0f} MB/s  ratio {w / d:5.2f}")
        children = Path(f"/proc/{wrapped.pid}/task/{wrapped.pid}/children").read_text().split()
        wrapper_kib, server_kib = rss_kib(wrapped.pid), rss_kib(int(children[0]))
        print(
            f"  memory   wrapper {wrapper_kib / 1024:.1f} MiB resident (the echo server it fronts: "
            f"{server_kib / 1024:.1f} MiB)"
        )
    finally:
        for proc in (direct, wrapped):
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
