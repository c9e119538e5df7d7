"""The server's network namespace (:mod:`paitient.hub.servernet`), tried with real processes.

A stand-in "server" (a small Python program run by the wrapper as ``nobody``) answers on its port inside
the namespace and probes the host from there. Every host service here is a listener this test started on
loopback; the tests check what reached them.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest
from jupyterhub.utils import random_port

from paitient.hub.spawner import server_command

NOBODY = pwd.getpwnam("nobody")

# The stand-in server: reports what it sees, then echoes every connection on its port (upper-cased, so an
# answer cannot come from anywhere else).
SERVER = """
import errno, json, os, socket, sys, threading
PORT, HUB, OTHERS = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])

def attempt(host, port):
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"hello\\n")
            s.shutdown(socket.SHUT_WR)
            return "open:" + s.recv(100).decode()
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e))

def routes():
    v4 = [ln.split()[0] for ln in open("/proc/net/route").read().splitlines()[1:]]
    v6 = [ln.split()[-1] for ln in open("/proc/net/ipv6_route").read().splitlines() if ln.strip()]
    return sorted(set(v4) | set(v6))

report = {
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "interfaces": [n for _, n in socket.if_nameindex()],
    "routes": routes(), "hub": attempt("127.0.0.1", HUB),
    "others": {str(p): attempt(h, p) for h, p in OTHERS},
}
srv = socket.create_server(("127.0.0.1", PORT))
print("@@" + json.dumps(report), flush=True)  # listening: the test may connect
def echo(c):
    with c:
        while data := c.recv(65536):
            c.sendall(data.upper())
while True:
    c, _ = srv.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"""


class HostListener:
    """A TCP listener on the host that answers ``hub:<what it read>`` and records every connection."""

    def __init__(self, family: int = socket.AF_INET, host: str = "127.0.0.1"):
        self.sock = socket.create_server((host, 0), family=family)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                data = conn.recv(100)
                conn.sendall(b"hub:" + data)

    def close(self) -> None:
        self.sock.close()


class Wrapped:
    def __init__(self, proc: subprocess.Popen, port: int):
        self.proc, self.port = proc, port
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("@@"), (line, proc.stderr.read() if proc.poll() is not None else "")  # type: ignore[union-attr]
        self.report = json.loads(line[2:])

    def child_pid(self) -> int:
        children = open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read().split()
        assert len(children) == 1, children
        return int(children[0])

    def ask(self, data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(1 << 20):
                out += chunk
            return out


@pytest.fixture
def hub_api() -> Iterator[HostListener]:
    listener = HostListener()
    yield listener
    listener.close()


@pytest.fixture
def others() -> Iterator[list[HostListener]]:
    listeners = [HostListener(), HostListener(), HostListener(socket.AF_INET6, "::1")]
    yield listeners
    for listener in listeners:
        listener.close()


@pytest.fixture
def wrapped(hub_api, others) -> Iterator[Wrapped]:
    port = random_port()
    targets = json.dumps([["127.0.0.1", o.port] for o in others[:2]] + [["::1", others[2].port]])
    command = [sys.executable, "-I", "-c", textwrap.dedent(SERVER), str(port), str(hub_api.port), targets]
    argv = server_command("nobody", [4242], ("127.0.0.1", port), f"http://127.0.0.1:{hub_api.port}/hub/api", command)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        yield Wrapped(proc, port)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def test_the_server_has_only_loopback_and_no_route(wrapped):
    assert wrapped.report["interfaces"] == ["lo"]
    assert wrapped.report["routes"] == ["lo"]


def test_the_server_reaches_the_hub_api(wrapped, hub_api):
    assert wrapped.report["hub"] == "open:hub:hello\n"
    assert hub_api.accepted == 1


def test_every_other_host_service_is_refused_to_the_server(wrapped, others):
    assert set(wrapped.report["others"].values()) == {"ECONNREFUSED"}, wrapped.report
    assert [o.accepted for o in others] == [0, 0, 0]


def test_the_server_runs_as_the_account_with_exactly_the_given_groups(wrapped):
    assert wrapped.report["uid"] == NOBODY.pw_uid
    assert wrapped.report["gid"] == NOBODY.pw_gid and wrapped.report["groups"] == [4242]
    status = open(f"/proc/{wrapped.child_pid()}/status").read()
    assert "CapEff:\t0000000000000000" in status and "NoNewPrivs:\t1" in status


def test_the_server_lives_in_another_network_namespace_than_the_host(wrapped):
    child = os.stat(f"/proc/{wrapped.child_pid()}/ns/net").st_ino
    assert child != os.stat("/proc/self/ns/net").st_ino
    assert os.stat(f"/proc/{wrapped.proc.pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino


def test_the_host_port_reaches_the_server_and_carries_large_bodies_whole(wrapped):
    assert wrapped.ask(b"ping") == b"PING"
    body = os.urandom(8 << 20).hex().encode()[: 12 << 20]
    assert wrapped.ask(body) == body.upper()


def test_many_connections_at_once(wrapped):
    results: list[bytes] = []

    def one(i: int) -> None:
        results.append(wrapped.ask(f"c{i}".encode() * 1000))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == sorted(f"C{i}".encode() * 1000 for i in range(40))


def test_the_wrapper_runs_on_the_standard_library_without_asyncio(wrapped):
    # one wrapper per server: site-packages, asyncio and ssl would be about 6 MiB more in each
    argv = open(f"/proc/{wrapped.proc.pid}/cmdline", "rb").read().split(b"\0")
    assert argv[1:3] == [b"-I", b"-S"]  # isolated, without site-packages
    maps = open(f"/proc/{wrapped.proc.pid}/maps").read()
    loaded = {m.split("/")[-1].split(".")[0] for m in maps.split() if "/lib-dynload/" in m}
    assert "_ctypes" in loaded  # the view works: the module of its namespace calls is there
    assert not loaded & {"_asyncio", "_ssl"}, loaded


def test_sigterm_reaches_the_server_and_the_wrapper_ends_with_its_status(wrapped):
    child = wrapped.child_pid()
    wrapped.proc.send_signal(signal.SIGTERM)
    assert wrapped.proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert not os.path.exists(f"/proc/{child}")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", wrapped.port), timeout=5)


def test_a_killed_wrapper_takes_its_server_with_it(wrapped):
    child = wrapped.child_pid()
    wrapped.proc.kill()
    wrapped.proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":  # ended; its reaper (init) has not collected it yet
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the server {child} outlived its wrapper")


def test_a_server_not_yet_listening_closes_the_connection_and_nothing_hangs(hub_api):
    port = random_port()
    command = [sys.executable, "-I", "-c", "import time; time.sleep(60)"]
    argv = server_command("nobody", [], ("127.0.0.1", port), f"http://127.0.0.1:{hub_api.port}/hub/api", command)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "the wrapper never listened"
                time.sleep(0.05)
        with s:
            s.settimeout(5)
            assert s.recv(10) == b""
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()  # type: ignore[union-attr]


def test_a_root_server_is_refused():
    argv = server_command("root", [], ("127.0.0.1", random_port()), "http://127.0.0.1:9/hub/api", ["true"])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "refusing to run a server as root" in r.stderr


def test_a_hub_api_not_on_loopback_is_refused_before_anything_starts():
    with pytest.raises(ValueError, match="must listen on 127.0.0.1"):
        server_command("nobody", [], ("127.0.0.1", 1), "http://10.0.0.1:8081/hub/api", ["true"])


# --hold: the same namespace and forwarding with nothing started; a server joins it from outside (as a
# container does), here the stand-in, entered with nsenter as nobody.
@pytest.fixture
def held(hub_api, others) -> Iterator[tuple[subprocess.Popen, Wrapped]]:
    from paitient.hub.spawner import SERVERNET

    port = random_port()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-I",
            str(SERVERNET),
            "--hold",
            f"--listen=127.0.0.1:{port}",
            f"--hub-api=127.0.0.1:{hub_api.port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    line = holder.stdout.readline()  # type: ignore[union-attr]
    assert line.startswith("servernet: holding "), (line, holder.stderr.read() if holder.poll() is not None else "")  # type: ignore[union-attr]
    targets = json.dumps([["127.0.0.1", o.port] for o in others[:2]] + [["::1", others[2].port]])
    joined = subprocess.Popen(
        [
            "nsenter",
            f"--net=/proc/{holder.pid}/ns/net",
            "--",
            "setpriv",
            f"--reuid={NOBODY.pw_uid}",
            f"--regid={NOBODY.pw_gid}",
            "--clear-groups",
            "--no-new-privs",
            sys.executable,
            "-I",
            "-c",
            textwrap.dedent(SERVER),
            str(port),
            str(hub_api.port),
            targets,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield holder, Wrapped(joined, port)
    finally:
        for proc in (joined, holder):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
            proc.stdout.close()  # type: ignore[union-attr]
            proc.stderr.close()  # type: ignore[union-attr]


def test_a_held_namespace_gives_a_joining_server_what_a_wrapped_one_gets(held, hub_api, others):
    holder, server = held
    assert server.report["interfaces"] == ["lo"] and server.report["routes"] == ["lo"]
    assert server.report["hub"] == "open:hub:hello\n" and hub_api.accepted == 1
    assert set(server.report["others"].values()) == {"ECONNREFUSED"} and [o.accepted for o in others] == [0, 0, 0]
    assert server.ask(b"ping") == b"PING"  # the host's port reaches it
    # the holder lives in the namespace it holds (so /proc/<pid>/ns/net names it); it runs nothing itself
    assert os.stat(f"/proc/{holder.pid}/ns/net").st_ino == os.stat(f"/proc/{server.proc.pid}/ns/net").st_ino
    assert os.stat(f"/proc/{holder.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
    assert open(f"/proc/{holder.pid}/task/{holder.pid}/children").read().split() == []


def test_a_holder_ends_at_sigterm_and_its_port_closes(held):
    holder, server = held
    holder.send_signal(signal.SIGTERM)
    assert holder.wait(timeout=30) == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5)


def test_hold_takes_no_command():
    from paitient.hub.spawner import SERVERNET

    argv = [
        sys.executable,
        "-I",
        str(SERVERNET),
        "--hold",
        "--listen=127.0.0.1:1",
        "--hub-api=127.0.0.1:2",
        "--",
        "true",
    ]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--hold starts nothing" in r.stderr
