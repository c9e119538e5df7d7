"""Attacks on the services' sockets, for real: real services as root, real accounts, real connections.

- an unrelated local account cannot open the audit, ledger or airlock socket at all (0660, the workspace's group);
- an account in the group that is not in the registry is refused with ``unknown_caller``, and the refusal is
  in the audit trail (once, however often it tries);
- one account flooding the audit socket is refused with ``rate_limited`` / ``too_many_connections`` while
  another account's records are each written within a bound.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from paitient.registry import Member, Registry
from paitient.services.audit.writer import trail_files
from paitient.services.kit.access import WORKSPACE_LIMITS
from tests import workspacegroup

SERVICES = ("audit", "ledger", "airlock")
GATE = ("egress", "launcher")
"""The sockets only users' servers use (in ``<state_dir>/gate``, a folder no sandbox binds)."""


def sock_path(site, name):
    return (site.state_dir / "gate" if name in GATE else site.run_dir) / f"{name}.sock"


OTHER_RECORD_BOUND_S = 0.5
"""How long one record of a well-behaved account may take while another account floods the socket."""


@contextlib.contextmanager
def services(site, names):
    """``paitient service NAME`` for each name, as root, on the site's state dir; stopped by their pids."""
    procs = []
    logs = []
    site.state_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "JUPYTERHUB_SERVICE_URL": "", "JUPYTERHUB_API_TOKEN": ""}
    try:
        for name in names:
            logs.append(open(site.state_dir / f"{name}.log", "w"))  # noqa: SIM115 - closed below
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "paitient.cli", "service", name, f"--state-dir={site.state_dir}"],
                    stdout=logs[-1],
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
        deadline = time.monotonic() + 60
        for name, proc in zip(names, procs, strict=True):
            while not sock_path(site, name).exists():
                assert proc.poll() is None, f"{name} did not start: {(site.state_dir / f'{name}.log').read_text()}"
                assert time.monotonic() < deadline, f"{name} did not start"
                time.sleep(0.05)
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for f in logs:
            f.close()


def as_account(user, code: str, *, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run Python ``code`` as ``user`` with the supplementary groups /etc/group gives it (as a server would)."""
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--init-groups",
            sys.executable,
            "-c",
            textwrap.dedent(code),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "HOME": "/"},
    )


def call_each(site, names) -> str:
    """Code that calls each service's socket once and prints ``name code message`` per refusal."""
    return f"""
        from paitient.channel import ChannelError, call
        for name in {list(names)!r}:
            try:
                call({str(site.run_dir)!r} + "/" + name + ".sock", "record" if name == "audit" else "status", {{}})
                print(name, "ANSWERED")
            except ChannelError as e:
                print(name, e.code, e)
    """


def records(site):
    out = []
    for _, path in trail_files(site.state_dir / "audit"):
        out += [json.loads(line) for line in path.read_bytes().splitlines()]
    return out


def test_the_sockets_are_root_and_the_workspace_group_0660(site):
    with services(site, SERVICES):
        for name in SERVICES:
            st = os.stat(site.run_dir / f"{name}.sock")
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660, name
            assert st.st_uid == 0 and st.st_gid == grp.getgrnam(site.accounts.group).gr_gid, name


def test_the_gate_sockets_are_root_and_the_workspace_group_0660_and_refuse_an_outsider(site, make_system_user):
    outsider = make_system_user("outsider", member=False)
    with services(site, GATE):
        for name in GATE:
            st = os.stat(sock_path(site, name))
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660, name
            assert st.st_uid == 0 and st.st_gid == grp.getgrnam(site.accounts.group).gr_gid, name
        paths = [str(sock_path(site, name)) for name in GATE]
        out = as_account(
            outsider,
            f"""
            import errno, socket
            for path in {paths!r}:
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(path)
                    print("CONNECTED")
                except OSError as e:
                    print(errno.errorcode[e.errno])
            """,
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["EACCES", "EACCES"]


def test_an_unrelated_local_account_cannot_even_connect(site, make_system_user):
    outsider = make_system_user("outsider", member=False)
    with services(site, SERVICES):
        out = as_account(outsider, call_each(site, SERVICES))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3, out.stdout
    for name, line in zip(SERVICES, lines, strict=True):
        assert line.startswith(f"{name} unavailable this account may not open the service's socket"), line


def test_an_unregistered_account_in_the_group_is_refused_and_the_refusal_is_audited(site, make_system_user):
    stranger = make_system_user("stranger")  # in the workspace group, but never signed in: not in the registry
    with services(site, SERVICES):
        first = as_account(stranger, call_each(site, SERVICES))
        again = as_account(stranger, call_each(site, SERVICES))
    for out in (first, again):
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert len(lines) == 3, out.stdout
        for name, line in zip(SERVICES, lines, strict=True):
            assert line.startswith(f"{name} unknown_caller the {name} service serves only this workspace's"), line
            assert f"uid {stranger.pw_uid} ({stranger.pw_name}) is not one of them" in line
    refused = [r for r in records(site) if r["action"] == "channel.refused"]
    # one record per service for the six refusals: the second round falls in the same minute
    assert sorted(r["object"] for r in refused) == sorted(SERVICES)
    for r in refused:
        assert r["actor"] == f"uid:{stranger.pw_uid}" and r["outcome"] == "denied"
        assert r["details"]["code"] == "unknown_caller" and r["details"]["peer"]["uid"] == stranger.pw_uid
    # nothing the stranger sent was recorded as theirs
    assert not [r for r in records(site) if r["action"] == "cell.execute"]


FLOOD = """
    import collections, json, sys, threading, time
    from paitient.server.audit import send
    from paitient.services.audit import AuditError
    run_dir, seconds = sys.argv[1], float(sys.argv[2])
    codes = collections.Counter()
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def hammer():
        while time.monotonic() < end:
            try:
                send(run_dir, action="cell.execute", object="flood", details={"code": "x"}, timeout=10)
                code = "ok"
            except AuditError as e:
                code = e.code
            with lock:
                codes[code] += 1

    threads = [threading.Thread(target=hammer) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(codes))
"""

STEADY = """
    import json, sys, time
    from paitient.server.audit import send
    run_dir, n = sys.argv[1], int(sys.argv[2])
    took = []
    for i in range(n):
        t0 = time.monotonic()
        send(run_dir, action="cell.execute", object="steady", details={"code": f"y = {i}"}, timeout=10)
        took.append(time.monotonic() - t0)
        time.sleep(0.1)
    print(json.dumps(took))
"""


def test_one_accounts_flood_does_not_delay_anothers_records(site, make_system_user):
    flooder, worker = make_system_user("flooder"), make_system_user("worker")
    registry = Registry.for_state_dir(site.state_dir)
    registry.put(Member(username="mallory", account=flooder.pw_name, uid=flooder.pw_uid))
    registry.put(Member(username="wendy", account=worker.pw_name, uid=worker.pw_uid))
    seconds, steady_n = 6.0, 30

    def start(user, code, *args):
        return subprocess.Popen(
            [
                "setpriv",
                f"--reuid={user.pw_uid}",
                f"--regid={user.pw_gid}",
                "--init-groups",
                sys.executable,
                "-c",
                textwrap.dedent(code),
                str(site.run_dir),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "HOME": "/"},
        )

    with services(site, ("audit",)):
        flood = start(flooder, FLOOD, str(seconds))
        time.sleep(1.0)  # the flood is under way (its burst spent) before the other account starts
        steady = start(worker, STEADY, str(steady_n))
        s_out, s_err = steady.communicate(timeout=120)
        f_out, f_err = flood.communicate(timeout=120)
    assert steady.returncode == 0, s_err
    assert flood.returncode == 0, f_err
    took = json.loads(s_out)
    codes = json.loads(f_out)
    # the flooder was told why, specifically, and got no more than its share through
    assert codes.get("rate_limited", 0) + codes.get("too_many_connections", 0) > 100, codes
    assert set(codes) <= {"ok", "rate_limited", "too_many_connections"}, codes
    share = WORKSPACE_LIMITS.burst + WORKSPACE_LIMITS.rate * (seconds + 2)
    assert codes.get("ok", 0) <= share, codes
    # every record of the other account was written, each within the bound
    assert len(took) == steady_n
    assert max(took) < OTHER_RECORD_BOUND_S, sorted(took)[-5:]
    recorded = [r for r in records(site) if r["object"] == "steady"]
    assert [r["actor"] for r in recorded] == ["wendy"] * steady_n
    mallory = [r for r in records(site) if r["actor"] == "mallory" and r["action"] == "cell.execute"]
    assert len(mallory) == codes.get("ok", 0)
    limited = [r for r in records(site) if r["action"] == "channel.refused" and r["actor"] == "mallory"]
    assert 1 <= len(limited) <= 2  # one per refusal reason in the minute, not one per refusal


@pytest.mark.parametrize("name", ["ledger", "airlock"])
def test_a_registered_account_reaches_the_service(site, make_system_user, name):
    """The same sockets still serve the workspace's own accounts (their refusals are the service's own)."""
    member = make_system_user("member")
    Registry.for_state_dir(site.state_dir).put(Member(username="rosa", account=member.pw_name, uid=member.pw_uid))
    with services(site, (name,)):
        out = as_account(member, call_each(site, (name,)))
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert "unknown_caller" not in line and "may not open" not in line, line
    assert workspacegroup.GROUP == site.accounts.group


HOLD = """
    import select, socket, sys, time
    held = []
    for _ in range(9):
        s = socket.socket(socket.AF_UNIX)
        s.connect(sys.argv[1] + "/audit.sock")
        held.append(s)
    # the ninth the service takes is refused at once: whichever of the nine that is (it takes each on a thread
    # of its own, in any order)
    answered, _, _ = select.select(held, [], [], 10)
    print(answered[0].recv(4096).decode().strip() if answered else "", flush=True)
    sys.stdin.read()  # the other eight held, sending nothing, until the test is done
"""


def test_a_kernel_holding_its_accounts_connections_does_not_refuse_its_servers_records(site, make_system_user):
    """Attack: a kernel (another pid namespace, its account's uid) opens eight connections to the audit socket
    and sends nothing. The caps were per uid, so the server's own records were refused with
    ``too_many_connections`` (its ``kernel.start`` of another kernel was lost, only logged). A user's server and
    its kernels now have caps of their own: the kernel's ninth connection is refused, the server's record is
    written."""
    alice = make_system_user("alice")
    Registry.for_state_dir(site.state_dir).put(Member(username="alice", account=alice.pw_name, uid=alice.pw_uid))
    with services(site, ("audit",)):
        kernel = subprocess.Popen(  # noqa: S603 - the test's own child, as alice in a pid namespace of its own
            ["unshare", "--pid", "--fork", "setpriv", f"--reuid={alice.pw_uid}", f"--regid={alice.pw_gid}",
             "--init-groups", sys.executable, "-c", textwrap.dedent(HOLD), str(site.run_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
            env={"PATH": "/usr/bin:/bin", "HOME": "/"},
        )  # fmt: skip
        try:
            assert kernel.stdout is not None
            ninth = json.loads(kernel.stdout.readline())
            assert ninth["code"] == "too_many_connections" and "kernels already hold 8" in ninth["error"], ninth
            server = as_account(
                alice,
                f"""
                from paitient.server.audit import send
                print(send({str(site.run_dir)!r}, action="kernel.start", object="k2", details={{}})["seq"])
                """,
            )
            assert server.returncode == 0, server.stderr
        finally:
            kernel.communicate(input="", timeout=30)
    started = [r for r in records(site) if r["action"] == "kernel.start"]
    assert [(r["actor"], r["object"], r["details"]["peer"]["origin"]) for r in started] == [("alice", "k2", "host")]


HAND_OVER = """
    import array, socket, sys, time
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(sys.argv[1] + "/audit.sock")
    out = socket.socket(fileno=int(sys.argv[2]))  # the test's end of a socketpair: the connection goes there
    out.sendmsg([b"c"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [conn.fileno()]))])
    time.sleep(0.5)  # the service has taken the connection by now
"""


def _take_pid(pid: int) -> subprocess.Popen | None:
    """A process of this pid namespace started with ``pid`` (the kernel's last-given pid set just below it),
    or None where another process took it first."""
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(pid - 1))
    proc = subprocess.Popen(["sleep", "60"])  # noqa: S607 - the test's own child, ended below
    if proc.pid == pid:
        return proc
    proc.kill()
    proc.wait()
    return None


def test_a_kernels_connection_is_not_taken_for_its_servers_when_a_server_side_process_gets_its_pid(
    site, make_system_user
):
    """Attack: a kernel (its account's uid, a pid namespace of its own) connects to the audit socket, hands
    the connection to another process and ends; a process of the host's pid namespace gets its pid; the
    record sent on the connection was then marked ``host``, as the user's server's (the service read the
    namespace of whatever had the pid when the record came). The namespace is now read at the connection, of
    the process that connected: ``namespaced``."""
    alice = make_system_user("alice")
    Registry.for_state_dir(site.state_dir).put(Member(username="alice", account=alice.pw_name, uid=alice.pw_uid))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    taker = None
    with services(site, ("audit",)), ours:
        try:
            kernel = subprocess.Popen(  # noqa: S603 - the test's own child, as alice in a pid namespace of its own
                ["unshare", "--pid", "--fork", "setpriv", f"--reuid={alice.pw_uid}", f"--regid={alice.pw_gid}",
                 "--init-groups", sys.executable, "-c", textwrap.dedent(HAND_OVER), str(site.run_dir),
                 str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/",
                env={"PATH": "/usr/bin:/bin", "HOME": "/"},
            )  # fmt: skip
            theirs.close()
            # the kernel's pid as the host sees it: the child unshare forked into the new namespace
            time.sleep(0.2)
            children = Path(f"/proc/{kernel.pid}/task/{kernel.pid}/children").read_text().split()
            assert len(children) == 1, children
            pid = int(children[0])
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
            assert len(fds) == 1
            conn = socket.socket(fileno=fds[0])
            _, err = kernel.communicate(timeout=30)
            assert kernel.returncode == 0, err
            assert not Path(f"/proc/{pid}").exists()  # ended, and its pid free
            for _ in range(5):
                taker = _take_pid(pid)
                if taker is not None:
                    break
            assert taker is not None, f"no process of this namespace could be started with pid {pid}"
            with conn:
                conn.sendall(
                    json.dumps(
                        {
                            "op": "record",
                            "args": {"action": "kernel.start", "object": "k7", "outcome": "ok", "details": {}},
                        }
                    ).encode()
                )
                conn.sendall(b"\n")
                answer = json.loads(conn.makefile().readline())
            assert answer["ok"], answer
        finally:
            if taker is not None:
                taker.kill()
                taker.wait()
    started = [r for r in records(site) if r["action"] == "kernel.start"]
    assert [(r["object"], r["details"]["peer"]["origin"]) for r in started] == [("k7", "namespaced")]
