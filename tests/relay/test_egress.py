"""The egress gate over the pod network: the server's gate (the real client, :mod:`paitient.server.gate`) in
another pid namespace than the pod's relay, as the server's container is, reaches the real egress service
through the relay and the gateway, as its user; and the attacks on that path, each refused for its reason.

The egress service runs in this process on the site's gate socket; its matcher reads row ids from the text
(``row:<n>`` marks row n of ``oncology/breast_cancer``), so the path is tested apart from row detection
(tests/egress and tests/e2e attack the detection itself).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from paitient import podtokens
from paitient.registry import Registry
from paitient.rules.egress import ON_BEHALF, decode_header, encode_frame, header_length
from paitient.services.egress import socket_path
from paitient.services.egress.matcher import Matcher
from paitient.services.egress.service import EgressServer, EgressService, limits_for
from paitient.services.egress.store import EgressStore
from tests import workspacegroup
from tests.relay.conftest import as_account, connect, gateway_call, run
from tests.trail import trail_records

ROW = re.compile(rb"row:(\d+)")

CLIENT = """
import json, sys
from paitient.server.gate import EgressGate, _Link
gate = EgressGate(sys.argv[1], fail_closed_bytes=1024, unchecked_bytes=4096)
link = _Link(sys.argv[1])
for line in sys.stdin:
    ask = json.loads(line)
    if "frame" in ask:  # a frame as a server writes it, answered as it comes back
        out = link.request(ask["frame"], ask.get("payload", "").encode())
    else:  # one piece of output, as the server's kernel websocket asks about it
        c = gate.check_blocking(context=ask["context"], channel="kernel", object=ask["context"],
                                text=ask["text"].encode(), binary=b"\\0" * ask.get("binary", 0),
                                final=ask.get("final", False))
        out = {"forward": c.forward, "reason": c.reason, "notice": c.notice, "rows": c.rows}
    print(json.dumps(out), flush=True)
"""


class PodRows(Matcher):
    """Rows are whatever ``row:<n>`` marks the text carries, of the oncology project's one dataset."""

    def reveal(self, text: bytes, projects):
        ids = sorted({int(m) for m in ROW.findall(text)})
        return {"oncology/breast_cancer": np.array(ids, dtype=np.int64)} if ids and "oncology" in projects else {}


@pytest.fixture
def gate(pod) -> Iterator[EgressService]:
    """The egress service on the site's gate socket (root:workspace group, 0660), as on a host."""
    store = EgressStore.for_site(pod.site)
    service = EgressService(pod.site, store, PodRows(pod.site), Registry.for_state_dir(pod.site.state_dir))
    server = EgressServer(socket_path(pod.site), service, group=workspacegroup.gid())
    server.start_in_thread()
    try:
        yield service
    finally:
        server.shutdown()
        server.server_close()
        service.close()
        store.close()


class Server:
    """The pod's server, as far as the gate goes: the real gate client, a process of the pod's user, asked one
    line at a time."""

    def __init__(self, pod, path: str):
        self.proc = subprocess.Popen(
            [*as_account(pod.user), sys.executable, "-c", textwrap.dedent(CLIENT), path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(pod.tmp / "server.log", "ab"),  # noqa: SIM115 (closed with the process)
            text=True,
            env={"PATH": "/usr/bin:/bin"},
        )

    def ask(self, **ask: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(ask) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the server's gate client ended"
        return json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def server(pod) -> Server:
    return Server(pod, str(pod.egress_sock))


def hello() -> dict[str, Any]:
    return {"frame": {"op": "hello", "id": "h1"}}


def rows(first: int, last: int) -> str:
    return "\n".join(f"row:{i}" for i in range(first, last))


def test_a_pods_server_reaches_the_egress_gate_as_its_user(pod, gate):
    alice = gate.registry.by_uid(pod.user.pw_uid)
    assert alice is not None
    most = limits_for(pod.site, alice).max_rows_per_output
    with pod.relay(own_pids=True):
        s = server(pod)
        try:
            answer = s.ask(**hello())
            assert answer["ok"] is True and answer["user"] == "alice", answer
            assert answer["limits"]["max_rows_per_output"] == most
            # a few rows pass, counted; a megabyte of binary output with them goes both ways through the pipe
            few = s.ask(context="exec-1", text=rows(0, 3), binary=1 << 20, final=True)
            assert few == {"forward": True, "reason": None, "notice": "", "rows": {"oncology/breast_cancer": 3}}
            # an output revealing more rows than one output may is withheld, with the service's reason
            many = s.ask(context="exec-2", text=rows(100, 101 + most), final=True)
            assert many["forward"] is False and many["reason"] == "rows", many
            assert f"{most + 1:,} rows of" in many["notice"], many
        finally:
            s.close()
    forwarded = [r for r in trail_records(pod.site, action="egress.output") if r["object"] == "exec-1"]
    assert len(forwarded) == 1, forwarded
    rec = forwarded[0]
    assert rec["actor"] == "alice" and rec["outcome"] == "ok"
    assert rec["details"]["pod"] == pod.identity.pod
    assert rec["details"]["bytes"] == len(rows(0, 3)) + (1 << 20)
    withheld = trail_records(pod.site, action="egress.withheld")
    assert [(r["actor"], r["object"], r["details"]["pod"]) for r in withheld] == [("alice", "exec-2", pod.identity.pod)]


def test_a_kernel_in_the_pod_is_refused_at_the_egress_gate(pod, gate):
    # the relay and the caller in one pid namespace: the relay sees the caller's pid, so it is a kernel
    with pod.relay():
        s = server(pod)
        try:
            refused = s.ask(**hello())
            assert refused["ok"] is False and refused["code"] == "forbidden", refused
            assert "is a process of the kernels' container" in refused["error"]
            # the gate's client withholds what it cannot have checked
            big = s.ask(context="exec-1", text="x" * 2000)
            assert big["forward"] is False and big["reason"] == "unchecked", big
        finally:
            s.close()
    assert not trail_records(pod.site, action="egress.output")


def test_another_uid_is_refused_at_the_pods_egress_socket(pod, gate):
    with pod.relay(own_pids=True):
        sock = pod.egress_sock
        assert (sock.stat().st_mode & 0o777, sock.stat().st_uid) == (0o600, pod.user.pw_uid)
        os.chmod(sock, 0o666)  # past the socket's mode: the relay's own check of the peer's uid
        bob = run(
            [*as_account(pod.other), sys.executable, "-c", textwrap.dedent(CLIENT), str(sock)],
            stdin=json.dumps(hello()) + "\n",
        )
        refused = json.loads(bob.stdout)
        assert refused["code"] == "forbidden", refused
        assert f"uid {pod.other.pw_uid} is not this pod's uid {pod.user.pw_uid}" in refused["error"]


def frame_to_gate(account, frames: list[dict[str, Any]], pod) -> list[dict[str, Any]]:
    """``frames`` sent straight to the egress service's socket by a process of ``account``; its answers."""
    script = """
import json, socket, sys
from paitient.rules.egress import decode_header, encode_frame, header_length
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rb")
out = []
for frame in json.loads(sys.argv[2]):
    try:
        s.sendall(encode_frame(frame))
        raw = f.read(4)
    except OSError:
        raw = b""
    if not raw:
        out.append({"closed": True})
        break
    head, size = decode_header(f.read(header_length(raw)))
    f.read(size)
    out.append(head)
print(json.dumps(out))
"""
    r = run([*as_account(account), sys.executable, "-c", script, str(socket_path(pod.site)), json.dumps(frames)])
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_the_egress_service_takes_a_named_server_from_the_gateway_only(pod, gate):
    for_alice = {"uid": pod.user.pw_uid, "pod": pod.identity.pod, "origin": "server", "pid": 0, "start": None}
    # bob's own server naming alice's: refused, and the connection ends
    answers = frame_to_gate(pod.other, [{"op": ON_BEHALF, "id": 1, "on_behalf": for_alice}, hello()["frame"]], pod)
    assert answers[0]["ok"] is False and answers[0]["code"] == "forbidden", answers
    assert "only from the workspace's gateway" in answers[0]["error"]
    assert answers[1:] == [{"closed": True}]
    # the gateway's uid, naming nobody: no user of its own
    answers = frame_to_gate(pod.gateway, [hello()["frame"]], pod)
    assert answers[0]["code"] == "forbidden" and "is the workspace's gateway" in answers[0]["error"], answers
    # the gateway's uid naming a kernel, root, or a uid that is no workspace user
    for bad, code, says in (
        ({**for_alice, "origin": "kernel", "pid": 7}, "forbidden", "serves a pod's server only"),
        ({**for_alice, "uid": 0}, "bad_request", "not root"),
        ({**for_alice, "uid": 4_000_000}, "forbidden", "is not a workspace user"),
    ):
        answers = frame_to_gate(pod.gateway, [{"op": ON_BEHALF, "id": 1, "on_behalf": bad}], pod)
        assert answers[0]["code"] == code and says in answers[0]["error"], (bad, answers)
    # named once, the connection is alice's: a second naming is a frame like any other, not an identity
    answers = frame_to_gate(
        pod.gateway,
        [
            {"op": ON_BEHALF, "id": 1, "on_behalf": for_alice},
            {"op": ON_BEHALF, "id": 2, "on_behalf": {**for_alice, "uid": pod.other.pw_uid}},
            hello()["frame"],
        ],
        pod,
    )
    assert answers[0] == {"id": 1, "ok": True, "user": "alice", "pod": pod.identity.pod, "payload": 0}, answers
    assert answers[1]["code"] == "unknown_op", answers
    assert answers[2]["user"] == "alice", answers
    refusals = {(r["actor"], r["details"]["code"]) for r in trail_records(pod.site, action="channel.refused")}
    assert ("bob", "forbidden") in refusals and (f"uid:{pod.gateway.pw_uid}", "bad_request") in refusals, refusals


def test_a_stream_without_a_pods_token_or_for_another_service_is_refused(pod, gate):
    for header, code, says in (
        ({"token": "A" * 43, "stream": "egress"}, "forbidden", "not one the hub issued"),
        ({"stream": "egress"}, "forbidden", "carries no pod token"),
        ({"token": pod.token, "stream": "ledger"}, "bad_request", "stream one of egress"),
        ({"token": pod.token, "stream": "egress", "origin": "kernel"}, "bad_request", "a stream is"),
    ):
        refused = gateway_call(pod, header)
        assert refused["code"] == code and says in refused["error"], (header, refused)


def test_a_stream_ends_when_its_pods_token_is_revoked(pod, gate):
    with pod.relay(own_pids=True):
        s = server(pod)
        try:
            assert s.ask(**hello())["user"] == "alice"
            podtokens.revoke(pod.tokens_file(), "alice", group=pod.gateway.pw_gid)
            time.sleep(1.5)  # five checks of the token (--stream-check=0.3)
            # the stream is gone; the client's one reconnection finds the token refused
            refused = s.ask(**hello())
            assert refused["ok"] is False and refused["code"] == "forbidden", refused
            assert "not one the hub issued" in refused["error"]
        finally:
            s.close()


def test_the_relay_refuses_an_egress_socket_a_sandbox_binds(pod):
    for inside in (pod.run_dir / "egress.sock", pod.tmp / "data" / "egress.sock"):
        r = run(pod.relay_argv(f"--egress-socket={inside}"))
        assert r.returncode == 2, r.stderr
        assert f"the egress gate's socket {inside} lies in the" in r.stderr, r.stderr
        assert "which a kernel's sandbox binds" in r.stderr


def test_a_frame_through_the_gateway_is_the_egress_services_own(pod, gate):
    """The gateway carries bytes unread: a frame the service refuses is refused by the service, in its words."""
    with connect(pod, timeout=30) as s:
        s.sendall(json.dumps({"token": pod.token, "stream": "egress"}).encode() + b"\n")
        f = s.makefile("rb")
        accepted = json.loads(f.readline())
        assert accepted == {"ok": True, "result": {"user": "alice", "pod": pod.identity.pod}}
        s.sendall(encode_frame({"op": "check", "id": "c1", "context": "x", "channel": "smoke-signals"}, b"hi"))
        head, size = decode_header(f.read(header_length(f.read(4))))
        assert head["ok"] is False and head["code"] == "bad_request" and "channel must be one of" in head["error"]
        assert size == 0


def test_a_header_nested_too_deeply_is_refused_as_malformed(pod, gate):
    """Attack: a header line of arrays nested 100,000 deep. The parser's recursion error was not taken for a
    malformed header, and the caller got ``internal``; now ``bad_request``, and the gateway serves on."""
    depth = 100_000
    with connect(pod, timeout=30) as s:
        s.sendall(b'{"token": ' + b"[" * depth + b"]" * depth + b"}\n")
        answer = json.loads(s.makefile("rb").readline())
    assert answer["ok"] is False and answer["code"] == "bad_request", answer
    assert "one JSON header line per call" in answer["error"], answer
    with connect(pod, timeout=30) as s:
        s.sendall(json.dumps({"token": pod.token, "stream": "egress"}).encode() + b"\n")
        assert json.loads(s.makefile("rb").readline())["ok"] is True


def test_a_relay_that_cannot_serve_the_egress_socket_stops_with_the_reason_and_leaves_no_socket(pod):
    unwritable = pod.tmp / "state" / "gate-of-the-pod" / "egress.sock"  # under a folder of root's, 0755
    r = run(pod.relay_argv(f"--egress-socket={unwritable}"))
    assert r.returncode == 2, r.stderr
    assert f"cannot serve the egress socket at {unwritable}: Permission denied" in r.stderr, r.stderr
    assert pod.run_dir.is_dir()  # the services' sockets were made first, and are gone again
    assert not list(pod.run_dir.glob("*.sock"))
