"""What a one-shot call from a Kubernetes pod costs: a ledger query through the pod's relay and the services'
gateway, with TLS and in plain TCP, against the same query on the ledger's socket, as on a host.

    sudo /opt/paitient/venv/bin/python benchmarks/bench_relay.py [--repeat 300]

Sets up, in a temporary state directory, the real ledger service (root, its own process) and a member whose
uid is the pod's, then twice the pod of ``bench_gate.py --pod`` (its relay in a pid namespace of its own, the
gateway on loopback): once with TLS 1.3, once with ``--plain-tcp`` on both ends (a user has one pod at a
time, so one after the other). A process of the pod's uid alternates ``direct`` (the ledger's socket) and
``relay`` calls of ``budget`` (a read: the ledger answers from its database, nothing is written), one every
30 ms (under the ledger's 50 a second per uid). Each call
through the relay opens a connection to the gateway, so ``relay`` with TLS pays a handshake per call. Prints
medians, p90s and the ratios against ``direct`` in the same phase.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "extensions"))

from bench_gate import GATEWAY_UID, POD_UID, start_pod, stop, timed  # noqa: E402

from paitient.channel import call  # noqa: E402
from paitient.config import load  # noqa: E402
from paitient.registry import Member, Registry  # noqa: E402
from paitient.services.kit.access import workspace_group  # noqa: E402
from tests.groups import made_groups_removed  # noqa: E402
from tests.server.harness import service_process  # noqa: E402

PACE = 0.03
"""Seconds between calls: the ledger takes 50 a second from one uid (WORKSPACE_LIMITS), this stays under it."""


def runs(direct: Path, relayed: Path, group: int, repeat: int, out) -> None:
    os.setgroups([group])
    os.setgid(POD_UID)
    os.setuid(POD_UID)
    for path in (direct, relayed):
        answer = call(str(path), "budget", {}, timeout=30)
        assert answer["user"] == "bench", answer
    results: dict[str, list[float]] = {"direct": [], "relay": []}
    for _ in range(repeat):
        for name, path in (("direct", direct), ("relay", relayed)):
            results[name] += timed(lambda p=path: call(str(p), "budget", {}, timeout=30), 1)
            time.sleep(PACE)
    out.send(results)


def phase(site, base: Path, group: int, repeat: int, *, plain: bool) -> dict[str, list[float]]:
    procs, egress_socket = start_pod(site, base, plain=plain, gateway_groups=(group,))
    try:
        receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)
        child = multiprocessing.get_context("fork").Process(
            target=runs, args=(site.run_dir / "ledger.sock", egress_socket.parent / "services" / "ledger.sock",
                               group, repeat, send),
        )  # fmt: skip
        child.start()
        while not receive.poll(1):
            if not child.is_alive():
                sys.exit(f"the calls failed (exit {child.exitcode}); see above")
        results = receive.recv()
        child.join(30)
        return results
    finally:
        stop(procs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=300)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the ledger is root's, and the pod and the gateway run as uids of their own")
    logging.basicConfig(level=logging.WARNING)
    base = Path(tempfile.mkdtemp(prefix="bench-relay-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        site = load(None, overrides={"workspace": {"state_dir": str(base / "state"), "gateway_uid": GATEWAY_UID}})
        Registry.for_state_dir(site.state_dir).put(Member("bench", "pt-bench", POD_UID, ("oncology",), ("researcher",)))
        group = workspace_group(site)
        from paitient.config.reference import effective_toml

        site_file = base / "ledger-site.toml"
        site_file.write_text(effective_toml(site))
        with service_process(
            "ledger", site.run_dir / "ledger.sock", f"--site={site_file}", log_path=base / "ledger.log"
        ):
            tls = phase(site, base / "tls-pod", group, args.repeat, plain=False)
            plain = phase(site, base / "plain-pod", group, args.repeat, plain=True)
        print(f"ledger `budget` from a pod's uid, {args.repeat} calls each, load {os.getloadavg()[0]:.1f}")
        for label, results in (("TLS 1.3", tls), ("plain TCP", plain)):
            for name, values in results.items():
                q = statistics.quantiles(values, n=10)
                print(f"  {label:9s} {name:6s} median {statistics.median(values):6.3f} ms   p90 {q[-1]:6.3f} ms")
            ratio = statistics.median(results["relay"]) / statistics.median(results["direct"])
            print(f"  {label:9s} relay / direct: {ratio:.2f}x")
        print(
            "  TLS / plain through the relay: "
            f"{statistics.median(tls['relay']) / statistics.median(plain['relay']):.2f}x (a handshake per call)"
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    with made_groups_removed(workspace=True):
        main()
