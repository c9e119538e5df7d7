"""The unix-socket channel: peer credentials identify the caller, file descriptors travel, errors are JSON."""

import os
import subprocess
import sys

import pytest

from paitient.channel import MAX_REQUEST, ChannelError, call, read_line
from paitient.services.kit.channel import ChannelServer


@pytest.fixture
def server(world_tmp):
    def whoami(peer, args, fds):
        return {"uid": peer.uid, "pid": peer.pid, "account": peer.account}

    def read_fd(peer, args, fds):
        if len(fds) != 1:
            raise ChannelError("send exactly one file", "bad_request")
        return os.read(fds[0], 100).decode()

    def echo(peer, args, fds):
        return args.get("text", "")

    srv = ChannelServer(world_tmp / "run" / "t.sock", {"whoami": whoami, "read": read_fd, "echo": echo}, name="test")
    srv.start_in_thread()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_peer_credentials_name_the_caller(server):
    assert call(server.path, "whoami") == {"uid": os.getuid(), "pid": os.getpid(), "account": "root"}


def test_peer_credentials_of_another_uid(server):
    # A process running as 'nobody' is seen as nobody, whatever it might claim in its arguments.
    code = (
        "import json,sys; from paitient.channel import call; "
        f"print(json.dumps(call({str(server.path)!r}, 'whoami', {{'uid': 0}})))"
    )
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert '"uid": 65534' in out and '"account": "nobody"' in out


def test_file_descriptor_travels(server, tmp_path):
    f = tmp_path / "payload.txt"
    f.write_text("hello from the kernel")
    with open(f, "rb") as fh:
        assert call(server.path, "read", fds=[fh.fileno()]) == "hello from the kernel"


def test_unknown_op_and_refusal_are_reported(server):
    with pytest.raises(ChannelError, match="unknown operation 'nope'") as e:
        call(server.path, "nope")
    assert e.value.code == "unknown_op"
    with pytest.raises(ChannelError, match="send exactly one file"):
        call(server.path, "read")


def test_malformed_request_gets_json_error(server):
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(server.path))
        s.sendall(b"not json\n")
        assert b'"code": "bad_request"' in s.recv(1000)


def test_missing_service_says_so(tmp_path):
    with pytest.raises(ChannelError, match="is not running") as e:
        call(tmp_path / "absent.sock", "whoami")
    assert e.value.code == "unavailable"


def test_refuses_to_replace_a_non_socket(tmp_path):
    p = tmp_path / "x.sock"
    p.write_text("data")
    with pytest.raises(RuntimeError, match="is not a socket"):
        ChannelServer(p, {})


def test_many_callers_at_once_are_all_answered(world_tmp):
    # More simultaneous callers than a default accept queue holds: none may fail to connect.
    import threading
    import time

    def slow(peer, args, fds):
        time.sleep(0.05)
        return args["i"]

    srv = ChannelServer(world_tmp / "busy.sock", {"slow": slow}, name="busy")
    srv.start_in_thread()
    results, errors = [], []

    def one(i):
        try:
            results.append(call(srv.path, "slow", {"i": i}, timeout=30))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        srv.shutdown()
        srv.server_close()
    assert errors == [] and sorted(results) == list(range(64))


def test_a_service_stops_promptly_on_sigterm_however_often_it_comes(world_tmp):
    # The services' main loop must end on SIGTERM; a handler that takes a lock could hang it forever.
    import signal
    import textwrap
    import time

    code = textwrap.dedent("""
        import sys
        from paitient.services.kit.process import StopSignal
        stop = StopSignal(tick=0.01)
        print("ready", flush=True)
        stop.wait()
        print("stopped", flush=True)
    """)
    for _ in range(5):
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == 0 and p.stdout.read().strip() == "stopped"


def test_a_request_larger_than_the_limit_is_refused_and_a_large_answer_arrives_whole(server):
    with pytest.raises(ChannelError, match=f"request larger than {MAX_REQUEST} bytes; send less") as e:
        call(server.path, "echo", {"text": "x" * MAX_REQUEST})
    assert e.value.code == "too_large"
    text = "y" * (MAX_REQUEST // 2)  # many reads on the way back
    assert call(server.path, "echo", {"text": text}) == text


def _fds_of_this_process() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_descriptors_sent_with_each_piece_of_a_request_are_refused_not_kept(server):
    """Attack: a request line sent a byte at a time, each byte with 4 descriptors (the most one read takes),
    and no newline. The service kept every descriptor until the line ended, so a kernel (the sockets are in
    every sandbox) filled its descriptor table, and it could open nothing for anyone: the second piece
    got no answer, and the descriptors stayed open. Now the request is refused at the fifth descriptor, and
    the service holds none of them."""
    import socket
    import time

    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        before = _fds_of_this_process()
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(server.path))
            socket.send_fds(s, [b"{"], [fd] * 4)
            time.sleep(0.2)  # the service reads the first piece on its own
            socket.send_fds(s, [b" "], [fd] * 4)
            answer = s.recv(1000)
        assert b'"code": "bad_request"' in answer and b"at most 4 descriptors" in answer, answer
        deadline = time.monotonic() + 5
        while _fds_of_this_process() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _fds_of_this_process() == before  # the service's side is closed, the descriptors with it
    finally:
        os.close(fd)
    assert call(server.path, "echo", {"text": "still serving"}) == "still serving"


def test_a_request_nested_too_deeply_is_refused_and_its_descriptors_closed(server):
    """Attack: a request line of arrays nested 100,000 deep, with 4 descriptors. The JSON parser's recursion
    error was not taken for a malformed line: the caller got ``internal``, and the descriptors that came
    with the line were never closed, so a few hundred such requests filled the service's descriptor table.
    Now it is ``bad_request``, and the service holds none of them."""
    import socket
    import time

    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        before = _fds_of_this_process()
        depth = 100_000
        line = b'{"op": "echo", "args": {"text": ' + b"[" * depth + b"]" * depth + b"}}\n"
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(server.path))
            socket.send_fds(s, [line], [fd] * 4)
            answer = s.makefile("rb").readline()
        assert b'"code": "bad_request"' in answer and b"one JSON line" in answer, answer
        deadline = time.monotonic() + 5
        while _fds_of_this_process() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _fds_of_this_process() == before  # the service's copies are closed with the connection
    finally:
        os.close(fd)
    assert call(server.path, "echo", {"text": "still serving"}) == "still serving"


def test_a_request_trickled_a_byte_at_a_time_is_answered_at_the_timeout(world_tmp):
    """Attack: a byte every 0.2 s, under a service timeout of 1 s. The timeout applied to each read, so the
    connection (and a place of the caller's account) was held as long as the bytes kept coming. Now the
    whole line must come within the timeout: the service answers ``timeout`` while the bytes still come."""
    import socket
    import time

    srv = ChannelServer(world_tmp / "run" / "slow.sock", {"echo": lambda p, a, f: a}, name="test", timeout_seconds=1.0)
    srv.start_in_thread()
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(srv.path))
            s.settimeout(0.2)
            started = time.monotonic()
            answer = b""
            while not answer and time.monotonic() - started < 6:
                s.sendall(b" ")
                try:
                    answer = s.recv(1000)
                except TimeoutError:
                    pass
        assert b'"code": "timeout"' in answer, answer
        assert time.monotonic() - started < 3
    finally:
        srv.shutdown()
        srv.server_close()


def test_read_line_stops_at_the_newline_at_the_end_and_past_the_limit():
    chunks = iter([b'{"a"', b": 1}\n", b"never read"])
    assert read_line(lambda: next(chunks), 100, lambda: ValueError("too large")) == b'{"a": 1}\n'
    closed = iter([b"no newline", b""])
    assert read_line(lambda: next(closed), 100, lambda: ValueError("too large")) == b"no newline"
    endless = iter([b"z" * 60] * 3)
    with pytest.raises(ValueError, match="too large"):
        read_line(lambda: next(endless), 100, lambda: ValueError("too large"))
