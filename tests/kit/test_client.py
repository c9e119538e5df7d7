"""The one client shape of the services' sockets: timeouts, lost and garbled answers, peer credentials on the
service side, and one error type whose ``code`` callers act on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from paitient.channel import ChannelError, ServiceClient, call
from paitient.kernel.airlock.client import AirlockClient, AirlockError
from paitient.kernel.ledger import BudgetExceeded, LedgerClient, LedgerUnavailable
from paitient.services.kit.channel import ChannelServer


@pytest.fixture
def run_dir(world_tmp):
    d = world_tmp / "run"
    d.mkdir()
    return d


@pytest.fixture
def serve(run_dir):
    """serve(name, handlers, **kw): a ChannelServer at <run_dir>/<name>.sock, stopped after the test."""
    servers = []

    def start(name, handlers, **kw):
        srv = ChannelServer(run_dir / f"{name}.sock", handlers, name=name, **kw)
        srv.start_in_thread()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def raw_socket(run_dir):
    """raw_socket(name, reply): a listener that reads one line and then does ``reply(conn)`` (a broken service)."""
    listeners = []

    def start(name, reply):
        path = run_dir / f"{name}.sock"
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(str(path))
        lsock.listen(4)
        listeners.append(lsock)

        def loop():
            while True:
                try:
                    conn, _ = lsock.accept()
                except OSError:
                    return
                with conn:
                    conn.recv(65536)
                    reply(conn)

        threading.Thread(target=loop, daemon=True).start()
        return path

    yield start
    for lsock in listeners:
        lsock.close()


def test_no_answer_in_time_is_a_timeout_that_says_what_to_do(serve):
    release = threading.Event()
    srv = serve("slow", {"wait": lambda peer, args, fds: release.wait(10)})
    started = time.monotonic()
    try:
        with pytest.raises(ChannelError, match=r"did not answer 'wait' within 0.3 s; try again later") as e:
            call(srv.path, "wait", timeout=0.3)
    finally:
        release.set()
    assert e.value.code == "timeout" and time.monotonic() - started < 3


def test_a_service_that_hangs_up_or_answers_garbage(raw_socket):
    closed = raw_socket("closer", lambda conn: None)
    with pytest.raises(ChannelError, match="closed the connection without answering") as e:
        call(closed, "anything", timeout=5)
    assert e.value.code == "unavailable"
    garbled = raw_socket("garbled", lambda conn: conn.sendall(b"<html>not json</html>\n"))
    with pytest.raises(ChannelError, match="is not a paitient service answer; is it the right socket") as e:
        call(garbled, "anything", timeout=5)
    assert e.value.code == "bad_answer"


def test_the_service_refuses_a_request_that_never_ends(serve):
    srv = serve("patient", {"x": lambda peer, args, fds: 1}, timeout_seconds=0.3)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(srv.path))
        s.sendall(b'{"op": "x", ')  # no newline, and nothing more
        answer = s.recv(1000)
    assert b'"code": "timeout"' in answer and b"no complete request within 0.3 s" in answer


def test_a_failing_handler_answers_internal_without_its_traceback(serve):
    def broken(peer, args, fds):
        raise ValueError("secret detail of /var/lib/paitient")

    srv = serve("broken", {"op": broken})
    with pytest.raises(ChannelError) as e:
        call(srv.path, "op")
    assert e.value.code == "internal" and str(e.value) == "internal error in broken; see its log"


def test_a_socket_this_account_may_not_open(serve):
    srv = serve("private", {"x": lambda peer, args, fds: 1}, mode=0o600)
    code = textwrap.dedent(f"""
        from paitient.channel import call, ChannelError
        try:
            call({str(srv.path)!r}, "x")
        except ChannelError as e:
            print(e.code, e)
    """)
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.startswith("unavailable this account may not open the service's socket"), out.stderr


def test_service_clients_map_codes_to_their_own_exceptions(serve, run_dir):
    def reserve(peer, args, fds):
        raise ChannelError("epsilon 3 asked, but d has 1 left", "budget_exceeded")

    def other(peer, args, fds):
        raise ChannelError("no such request", "not_found")

    serve("ledger", {"reserve": reserve})
    serve("airlock", {"status": other})
    ledger = LedgerClient(run_dir)
    with pytest.raises(BudgetExceeded, match="epsilon 3 asked") as e:
        ledger.reserve("p", "d", 3.0, 1e-6)
    assert isinstance(e.value, ChannelError) and e.value.code == "budget_exceeded"
    with pytest.raises(AirlockError, match="no such request") as e:
        AirlockClient(run_dir).status("20260101-deadbeef")
    # The airlock's error is a ChannelError with its code, and still the RuntimeError it always was.
    assert isinstance(e.value, RuntimeError) and isinstance(e.value, ChannelError) and e.value.code == "not_found"


def test_a_ledger_that_is_down_or_slow_is_unavailable(serve, run_dir):
    with pytest.raises(LedgerUnavailable, match="is not running") as e:
        LedgerClient(run_dir).budget()
    assert e.value.code == "unavailable"
    release = threading.Event()
    serve("ledger", {"budget": lambda peer, args, fds: release.wait(10)})
    try:
        with pytest.raises(LedgerUnavailable, match="did not answer 'budget' within 0.2 s") as e:
            LedgerClient(run_dir, timeout=0.2).budget()
    finally:
        release.set()
    assert e.value.code == "timeout"


def test_outside_the_workspace_the_client_says_what_to_do(monkeypatch):
    monkeypatch.delenv("PAITIENT_RUN_DIR", raising=False)
    with pytest.raises(AirlockError, match="PAITIENT_RUN_DIR is not set, so the airlock service cannot be reached"):
        AirlockClient()

    class Example(ServiceClient):
        service = "example"

    with pytest.raises(ChannelError, match=r"Work inside a paitient kernel .*, or pass run_dir=\.\.\. explicitly") as e:
        Example()
    assert e.value.code == "unavailable"


def test_the_wire_client_is_standard_library_only():
    # A kernel imports it: nothing of the package's other zones and no third-party module may come with it.
    code = (
        "import sys; before = set(sys.modules); import paitient.channel; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names)))"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "['paitient']"
    code = "import sys, paitient.channel; print(sorted(m for m in sys.modules if m.startswith('paitient')))"
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "['paitient', 'paitient.channel']"


def test_peer_credentials_are_the_services_not_the_callers_word(serve):
    srv = serve("who", {"who": lambda peer, args, fds: {"uid": peer.uid, "pid": peer.pid, "root": peer.is_root}})
    assert call(srv.path, "who", {"uid": 1000}) == {"uid": 0, "pid": os.getpid(), "root": True}
