"""TLS between the pod's relay and the services' gateway: what crosses the pod network is encrypted, a relay
talks only to a gateway its authority vouches for, and neither end runs in the clear unless told to."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
from collections.abc import Iterator

from tests.relay.conftest import account_process, as_account, call_as, free_port, make_authority, run
from tests.trail import trail_records

CANARY = "tls-canary-7731"
RECORD = {"op": "record", "args": {"action": "cell.execute", "object": CANARY, "details": {"n": 1}}}


class Tap:
    """A TCP forwarder on loopback between the relay and the gateway that keeps every byte it carries."""

    def __init__(self, upstream: int):
        self.upstream = upstream
        self.seen = bytearray()
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream))
            self.open += [down, up]
            for src, dst in ((down, up), (up, down)):
                threading.Thread(target=self._copy, args=(src, dst), daemon=True).start()

    def _copy(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self.lock:
                    self.seen.extend(data)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        for s in self.open:
            s.close()


@contextlib.contextmanager
def tap(pod) -> Iterator[Tap]:
    t = Tap(pod.gateway_port)
    try:
        yield t
    finally:
        t.close()


def test_the_pods_token_and_its_calls_never_cross_the_network_in_the_clear(pod):
    with tap(pod) as wire, pod.relay(f"--gateway=127.0.0.1:{wire.port}"):
        sent = call_as(pod.user, pod.sock("audit"), RECORD)
        assert "ok" in sent, sent
    assert [r["actor"] for r in trail_records(pod.site, action="cell.execute")] == ["alice"]
    seen = bytes(wire.seen)
    assert len(seen) > 1000  # a handshake, the call and its answer (the relay's reports too)
    assert seen[:3] == b"\x16\x03\x01"  # a TLS handshake record opens the connection
    for secret in (pod.token.encode(), CANARY.encode(), b'"op"', b"cell.execute"):
        assert secret not in seen, secret


def test_a_relay_trusting_another_authority_sends_the_gateway_nothing(pod):
    other_ca, _, _ = make_authority(pod.tmp / "other-tls", "an authority this pod does not know")
    with tap(pod) as wire, pod.relay(f"--gateway=127.0.0.1:{wire.port}", f"--gateway-ca={other_ca}"):
        refused = call_as(pod.user, pod.sock("audit"), RECORD)
    assert refused["code"] == "unavailable", refused
    assert "is not the one this pod trusts (unable to get local issuer certificate)" in refused["error"]
    assert not trail_records(pod.site, action="cell.execute")
    assert pod.token.encode() not in bytes(wire.seen)


def test_a_call_in_the_clear_is_not_answered_and_not_made(pod):
    header = {"token": pod.token, "service": "audit", **RECORD, "origin": "kernel", "pid": 1, "start": None}
    header["files"] = []
    with socket.create_connection(("127.0.0.1", pod.gateway_port), timeout=30) as s:
        s.sendall(json.dumps(header).encode() + b"\n")
        try:
            answer = s.recv(65536)
        except ConnectionResetError:  # the gateway dropped it with the request unread
            answer = b""
    assert b"{" not in answer  # no answer of the gateway's: at most a TLS alert, then the end
    assert not trail_records(pod.site, action="cell.execute")


def test_neither_end_runs_in_the_clear_unless_told_to(pod):
    site_file = pod.site.state_dir / "site.toml"
    gateway = [*as_account(pod.gateway), sys.executable, "-I", "-m", "paitient.services.gateway"]
    gateway += [f"--site={site_file}", "--ip=127.0.0.1", f"--port={free_port()}"]
    r = run(gateway)
    assert r.returncode == 2 and "give the gateway's certificate and key (--tls-cert, --tls-key" in r.stderr, r.stderr
    r = run([*gateway, "--plain-tcp", f"--tls-cert={pod.authority}", f"--tls-key={pod.authority}"])
    assert r.returncode == 2 and "--plain-tcp and a TLS certificate exclude each other" in r.stderr, r.stderr
    r = run(pod.relay_argv("--gateway-ca="))
    assert r.returncode == 2 and "give the gateway's certificate authority (--gateway-ca)" in r.stderr, r.stderr
    r = run(pod.relay_argv("--plain-tcp"))
    assert r.returncode == 2 and "not both" in r.stderr, r.stderr
    r = run(pod.relay_argv(f"--gateway-ca={pod.tmp / 'no-such-ca.crt'}"))
    assert r.returncode == 2 and "cannot use" in r.stderr and "as the gateway's certificate authority" in r.stderr


def test_told_so_both_ends_speak_plain_tcp(pod):
    """Where the cluster's mesh or CNI encrypts the pod network, both ends are told --plain-tcp, and work."""
    port = free_port()
    log = pod.tmp / "plain-gateway.log"
    site_file = pod.site.state_dir / "site.toml"
    plain = [*as_account(pod.gateway), sys.executable, "-I", "-m", "paitient.services.gateway"]
    plain += [f"--site={site_file}", "--ip=127.0.0.1", f"--port={port}", "--plain-tcp"]
    with account_process(plain, log, lambda: log.exists() and b"plain TCP (--plain-tcp)" in log.read_bytes()):
        with pod.relay(f"--gateway=127.0.0.1:{port}", "--gateway-ca=", "--plain-tcp"):
            sent = call_as(pod.user, pod.sock("audit"), RECORD)
    assert "ok" in sent, sent
    assert [r["details"]["n"] for r in trail_records(pod.site, action="cell.execute")] == [1]
