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

With ``--pod``, also the path of a Kubernetes pod's server (docs/kubernetes.md): the pod's relay (its own uid,
in a pid namespace of its own, as the kernels container has it) and the services' gateway (another uid, TLS
1.3 on loopback) carry the same check to the same service. A process of the pod's uid then alternates
``direct`` (the service's socket, as on a host) and ``pod`` (the relay's socket), and the ratio pod / direct
is the price of the two hops and TLS on every output.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
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


POD_UID, GATEWAY_UID = 60917, 60918
"""``--pod``: the pod's uid and the gateway's, numbers no account has (checked at the start)."""


class CallerIsBench(Registry):
    """The gate runs in this process, as root, which no member may be: the service takes it for a researcher;
    so is the pod's uid (``--pod``)."""

    bench = Member("bench", "pt-bench", POD_UID, ("oncology",), ("researcher",))

    def by_uid(self, uid: int) -> Member | None:
        return self.bench if uid in (os.getuid(), POD_UID) else None


def serve(site, ready) -> None:
    """The egress service, as its own process runs it (the real matcher, store and socket; the gateway's and
    the pod's uid reach the socket through its group, as the workspace's accounts do)."""
    service = EgressService(
        site, EgressStore.for_site(site), Matcher(site), CallerIsBench.for_state_dir(site.state_dir)
    )
    server = EgressServer(socket_path(site), service, group=GATEWAY_UID if site.workspace.gateway_uid else None)
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


def as_uid(uid: int, *, groups: tuple[int, ...] = ()) -> list[str]:
    extra = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", extra]


def start_pod(
    site, base: Path, *, plain: bool = False, gateway_groups: tuple[int, ...] = ()
) -> tuple[list[subprocess.Popen], Path]:
    """The gateway (TLS on a loopback port, or ``plain`` TCP, as GATEWAY_UID with ``gateway_groups``) and a pod's
    relay (as POD_UID, in a pid namespace of its own) for the member ``bench``, in ``base``; the processes and
    the relay's egress socket (its other sockets beside it, in ``services/``)."""
    from paitient import podtokens
    from tests.relay.conftest import free_port, make_authority

    for uid in (POD_UID, GATEWAY_UID):
        try:
            pwd.getpwuid(uid)
            sys.exit(f"uid {uid} has an account here; change POD_UID and GATEWAY_UID in this benchmark")
        except KeyError:
            pass
    base.mkdir(mode=0o755, exist_ok=True)
    token, _ = podtokens.mint(podtokens.token_file(site.state_dir), "bench", POD_UID, group=GATEWAY_UID)
    ca, cert, key = make_authority(base / "tls", "bench authority")
    os.chown(key, GATEWAY_UID, GATEWAY_UID)
    pod = base / "pod"
    for folder in (pod, pod / "home", pod / "data", pod / "sockets", pod / "token"):
        folder.mkdir(mode=0o700)
        os.chown(folder, POD_UID, POD_UID)
    (pod / "token" / "token").write_text(token)
    os.chown(pod / "token" / "token", POD_UID, POD_UID)
    site_file = base / "site.toml"
    from paitient.config.reference import effective_toml

    site_file.write_text(effective_toml(site))
    port = free_port()
    logs = open(base / "pod.log", "ab")  # noqa: SIM115 (closed with the processes)
    python = [sys.executable, "-I", "-m"]
    gateway_tls = ["--plain-tcp"] if plain else [f"--tls-cert={cert}", f"--tls-key={key}"]
    gateway = subprocess.Popen(
        [*as_uid(GATEWAY_UID, groups=gateway_groups), *python, "paitient.services.gateway", f"--site={site_file}",
         "--ip=127.0.0.1", f"--port={port}", *gateway_tls],
        stdout=logs, stderr=logs, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    relay = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *as_uid(POD_UID), *python,
         "paitient.services.relay", f"--run-dir={pod / 'sockets' / 'services'}", f"--home={pod / 'home'}",
         f"--data-root={pod / 'data'}", f"--token-file={pod / 'token' / 'token'}", f"--gateway=127.0.0.1:{port}",
         "--plain-tcp" if plain else f"--gateway-ca={ca}", f"--egress-socket={pod / 'sockets' / 'egress.sock'}"],
        stdout=logs, stderr=logs, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (pod / "sockets" / "egress.sock").exists():
        if time.monotonic() > deadline or relay.poll() is not None or gateway.poll() is not None:
            sys.exit(f"the pod's relay or the gateway did not start: {(base / 'pod.log').read_text()[-2000:]}")
        time.sleep(0.05)
    return [relay, gateway], pod / "sockets" / "egress.sock"


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.args[0] == "unshare":  # the relay is unshare's one child, in the namespace
            from tests.relay.conftest import only_child

            os.kill(only_child(proc.pid), signal.SIGTERM)
        else:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def pod_runs(site, relay_socket: Path, ordinary: bytes, repeat: int, out) -> None:
    """In a child process of the pod's uid (with the workspace's group, so the direct socket takes it too):
    ``direct`` and ``pod`` checks of ``ordinary``, alternating; the times go to ``out``."""
    os.setgroups([GATEWAY_UID])
    os.setgid(POD_UID)
    os.setuid(POD_UID)
    gates = {
        name: EgressGate(
            path, fail_closed_bytes=site.egress.fail_closed_bytes, unchecked_bytes=site.egress.unchecked_bytes
        )
        for name, path in (("direct", str(socket_path(site))), ("pod", str(relay_socket)))
    }
    n = [0]

    def check(gate: EgressGate) -> bool:
        n[0] += 1
        answer = gate.check_blocking(
            context=f"kernel:pod:{n[0]}", channel="kernel", object="bench", text=ordinary, final=True
        )
        return answer.forward and answer.reason is None

    for name, gate in gates.items():
        assert check(gate), f"the {name} check was not answered by the service"
    results: dict[str, list[float]] = {"direct": [], "pod": []}
    for _ in range(repeat // 10):
        for name, gate in gates.items():
            results[name] += timed(lambda g=gate: check(g), 10)
    out.send(results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=300)
    ap.add_argument("--database-url", default="", help="a PostgreSQL [database] url for the counts (default: SQLite)")
    ap.add_argument("--passfile", default="", help="[database] passfile for --database-url")
    ap.add_argument("--pod", action="store_true", help="also the path of a Kubernetes pod's server")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the egress service knows its callers by uid from the root-owned registry")
    logging.basicConfig(level=logging.WARNING)
    base = Path(tempfile.mkdtemp(prefix="bench-gate-", dir="/tmp"))
    try:
        database = {"url": args.database_url, "passfile": args.passfile} if args.database_url else {}
        workspace = {"state_dir": str(base / "state"), **({"gateway_uid": GATEWAY_UID} if args.pod else {})}
        site = load(None, overrides={"workspace": workspace, "database": database})
        os.chmod(base, 0o755)  # the gateway's uid reaches the state directory's token file and sockets
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
        if args.pod:
            procs, relay_socket = start_pod(site, base)
            try:
                receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)
                child = multiprocessing.get_context("fork").Process(
                    target=pod_runs, args=(site, relay_socket, ordinary, args.repeat, send)
                )
                child.start()
                pod = receive.recv()
                child.join(30)
            finally:
                stop(procs)
            print(f"  as a pod's server (uid {POD_UID}), alternating, {args.repeat} runs each:")
            for name, values in pod.items():
                q = statistics.quantiles(values, n=10)
                print(f"  {name:6s} median {statistics.median(values):6.3f} ms   p90 {q[-1]:6.3f} ms")
            ratio = statistics.median(pod["pod"]) / statistics.median(pod["direct"])
            print(f"  pod / direct: {ratio:.2f}x   (the relay, the gateway and TLS on every output)")
        gate.shutdown()
        egress.terminate()
        egress.join(10)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    with made_groups_removed(workspace=True):  # the groups its publications made
        main()
