"""The sandbox launcher, asked by real accounts over its real socket: what it refuses, and what it starts.

Alice is in project ``onc``, Bob in ``card``; a third account is in no project and not in the registry.
Each request is sent by a process running as that account (the launcher knows the caller only from the
socket's peer credentials). The kernels it starts are real: bwrap as the user, with the user's projects'
groups and mounts, seen from ``/proc``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from jupyterhub.utils import random_port

from paitient.registry import Member, Registry
from paitient.rules.sandbox import user_runtime_dir
from paitient.services.data import access
from paitient.services.launcher import socket_path
from paitient.services.launcher.service import Launcher, LauncherServer
from tests import workspacegroup
from tests.server.harness import make_site, publish

ASK = """
import json, sys
from paitient import channel
try:
    print(json.dumps({"ok": channel.call(sys.argv[1], "start", json.loads(sys.argv[2]), timeout=60)}))
except channel.ChannelError as e:
    print(json.dumps({"error": str(e), "code": e.code}))
"""


def ask_as(pw, sock: Path, args: dict, groups: str | None = None) -> dict:
    """``start`` with ``args``, sent by a process of ``pw``'s account (``None``: root) with ``groups`` (a
    setpriv option; default: the workspace's group only, as the user's server has)."""
    groups = groups or workspacegroup.setpriv_groups()
    prefix = [] if pw is None else ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", groups]
    r = subprocess.run(
        [*prefix, sys.executable, "-c", textwrap.dedent(ASK), str(sock), json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=90,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def connection_file(pw, name: str = "kernel-abc123.json", **info) -> Path:
    """A connection file in ``pw``'s runtime dir, as the user's server writes it (ipc sockets in a folder of
    their own), owned by the user."""
    runtime = Path(user_runtime_dir(pw.pw_dir))
    home = Path(pw.pw_dir)
    for d in (home / ".local", home / ".local" / "share", home / ".local" / "share" / "jupyter", runtime):
        d.mkdir(mode=0o700, exist_ok=True)
        os.chown(d, pw.pw_uid, pw.pw_gid)
    kdir = runtime / ("k" + name.removeprefix("kernel-").removesuffix(".json")[:8])
    kdir.mkdir(mode=0o700, exist_ok=True)
    os.chown(kdir, pw.pw_uid, pw.pw_gid)
    body = {
        "transport": "ipc",
        "ip": str(kdir / "k"),
        "shell_port": 1,
        "iopub_port": 2,
        "stdin_port": 3,
        "control_port": 4,
        "hb_port": 5,
        "key": "0" * 32,
        "signature_scheme": "hmac-sha256",
        "kernel_name": "python3",
        **info,
    }
    path = runtime / name
    path.write_text(json.dumps(body))
    os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, 0o600)
    return path


@pytest.fixture
def world(world_tmp, make_system_user):
    site = make_site(world_tmp, {"onc": ["bc"], "card": ["dia"]}, accounts={"prefix": "tl" + os.urandom(2).hex()})
    publish(site, "onc", "bc", "id,size\n1,2.5\n")
    publish(site, "card", "dia", "id,glucose\nCARD-SECRET,7.1\n")
    alice, bob, stranger = make_system_user("alice"), make_system_user("bob"), make_system_user("stranger")
    registry = Registry.for_state_dir(site.state_dir)
    registry.put(Member(username="alice", account=alice.pw_name, uid=alice.pw_uid, projects=("onc",)))
    registry.put(Member(username="bob", account=bob.pw_name, uid=bob.pw_uid, projects=("card",)))
    access.sync(site)
    launcher = Launcher(site, registry)
    server = LauncherServer(socket_path(site), launcher, group=workspacegroup.gid())
    server.start_in_thread()
    try:
        yield site, launcher, server.path, {"alice": alice, "bob": bob, "stranger": stranger}
    finally:
        server.shutdown()
        server.server_close()
        for proc in list(launcher.children.values()):
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.parametrize(
    "extra",
    [
        {"mounts": [["/", "/host"]]},
        {"data": {"card": ["dia"]}},
        {"env": {"LD_PRELOAD": "/tmp/x.so"}},
        {"capabilities": ["CAP_SYS_ADMIN"]},
        {"argv": ["/bin/sh"]},
        {"bwrap_args": ["--bind", "/", "/"]},
    ],
)
def test_a_request_that_names_mounts_env_capabilities_or_a_command_is_refused(world, extra):
    site, launcher, sock, users = world
    conn = connection_file(users["alice"])
    answer = ask_as(users["alice"], sock, {"connection_file": str(conn), "kernel": "python3", **extra})
    assert answer["code"] == "field_refused", answer
    assert f"refused: {next(iter(extra))}" in answer["error"]
    assert launcher.children == {}


def test_connection_files_outside_the_callers_runtime_dir_are_refused(world):
    site, launcher, sock, users = world
    alice, bob = users["alice"], users["bob"]
    own = connection_file(alice)
    bobs = connection_file(bob)
    runtime = Path(user_runtime_dir(alice.pw_dir))
    (runtime / "kernel-link.json").symlink_to(bobs)
    os.lchown(runtime / "kernel-link.json", alice.pw_uid, alice.pw_gid)
    outside_sockets = connection_file(alice, "kernel-out.json", ip="/tmp/k")
    for path in (
        "/etc/passwd",
        str(bobs),
        str(runtime / ".." / own.name),
        str(Path(alice.pw_dir) / "kernel-abc123.json"),
        str(runtime / "kernel-link.json"),
        str(outside_sockets),
        "relative/kernel-abc123.json",
    ):
        answer = ask_as(alice, sock, {"connection_file": path, "kernel": "python3"})
        assert answer["code"] == "path_refused", (path, answer)
    assert launcher.children == {}


def test_root_and_accounts_the_registry_does_not_know_are_refused(world):
    site, launcher, sock, users = world
    conn = connection_file(users["stranger"])
    answer = ask_as(users["stranger"], sock, {"connection_file": str(conn), "kernel": "python3"})
    assert answer["code"] == "forbidden" and "not a workspace member" in answer["error"], answer
    answer = ask_as(None, sock, {"connection_file": str(conn), "kernel": "python3"})
    assert answer["code"] == "forbidden" and "root" in answer["error"], answer
    answer = ask_as(users["alice"], sock, {"connection_file": str(connection_file(users["alice"])), "kernel": "bash"})
    assert answer["code"] == "unknown_kernel", answer
    assert launcher.children == {}


def _sandbox_of(pid: int, timeout: float = 20.0) -> tuple[int, list[str]]:
    """The bwrap process under the kernel's keeper ``pid`` (its pid and command line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            argv = [a.decode() for a in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0") if a]
            if argv and argv[0].endswith("bwrap"):
                return int(child), argv
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} never started bwrap")


@contextlib.contextmanager
def staying(pw, sock: Path, args: dict):
    """``start`` asked by a process of ``pw`` that stays (as a server does) until the block ends."""
    code = ASK + "sys.stdout.flush()\nsys.stdin.read()\n"
    proc = subprocess.Popen(
        [
            "setpriv",
            f"--reuid={pw.pw_uid}",
            f"--regid={pw.pw_gid}",
            workspacegroup.setpriv_groups(),
            sys.executable,
            "-c",
            code,
            str(sock),
            json.dumps(args),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    try:
        yield proc, json.loads(proc.stdout.readline())
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_the_kernel_runs_as_the_caller_with_only_its_projects_groups_and_mounts(world):
    site, launcher, sock, users = world
    alice = users["alice"]
    conn = connection_file(alice)
    with staying(alice, sock, {"connection_file": str(conn), "kernel": "python3", "cwd": "/etc"}) as (_, answer):
        assert "ok" in answer, answer
        pid = answer["ok"]["pid"]
        _the_kernel_as_alice(site, alice, pid, answer)
    deadline = time.monotonic() + 10
    while launcher.children and time.monotonic() < deadline:
        time.sleep(0.05)
    assert launcher.children == {}  # killed with its server and reaped


def test_the_kernel_ends_when_the_server_that_asked_for_it_is_killed(world):
    site, launcher, sock, users = world
    alice = users["alice"]
    with staying(alice, sock, {"connection_file": str(connection_file(alice)), "kernel": "python3"}) as (
        server,
        answer,
    ):
        pid = answer["ok"]["pid"]
        bwrap, _ = _sandbox_of(pid)
        assert pid in launcher.children
        server.kill()
        server.wait(timeout=10)
        deadline = time.monotonic() + 10
        while pid in launcher.children and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid not in launcher.children and not Path(f"/proc/{pid}").exists()
        assert not Path(f"/proc/{bwrap}").exists()


def test_killing_the_pid_the_server_got_ends_the_sandbox(world):
    """What the user's server does to stop a kernel: SIGKILL to the pid the launcher answered (the keeper)."""
    site, launcher, sock, users = world
    alice = users["alice"]
    with staying(alice, sock, {"connection_file": str(connection_file(alice)), "kernel": "python3"}) as (_, answer):
        pid = answer["ok"]["pid"]
        bwrap, _ = _sandbox_of(pid)
        r = subprocess.run(
            ["setpriv", f"--reuid={alice.pw_uid}", f"--regid={alice.pw_gid}", "--clear-groups", "kill", "-9", str(pid)]
        )
        assert r.returncode == 0
        deadline = time.monotonic() + 10
        while Path(f"/proc/{bwrap}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{bwrap}").exists()


def _the_kernel_as_alice(site, alice, pid, answer):
    try:
        bwrap, argv = _sandbox_of(pid)
        status = Path(f"/proc/{bwrap}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        groups = next(line for line in status.splitlines() if line.startswith("Groups:")).split()[1:]
        onc = access.group_name(site, "onc")
        import grp

        assert uids == [str(alice.pw_uid)] * 4
        # its project's data group and the workspace's group (the sockets mounted into its sandbox), no other
        assert sorted(groups) == sorted([str(grp.getgrnam(onc).gr_gid), str(workspacegroup.gid())])
        assert answer["ok"]["datasets"] == ["onc/bc"]
        dests = [argv[i + 2] for i, a in enumerate(argv) if a in ("--bind", "--ro-bind", "--ro-bind-try")]
        assert "/data/onc/bc" in dests and not any(d.startswith("/data/card") for d in dests)
        assert not any(d == "/" or d.startswith(str(site.data_root)) for d in dests)
        assert argv[argv.index("--chdir") + 1] == alice.pw_dir  # a cwd outside the home becomes the home
        env = {argv[i + 1] for i, a in enumerate(argv) if a == "--setenv"}
        assert env == {
            "PATH",
            "HOME",
            "LANG",
            "PAITIENT_RUN_DIR",
            "PAITIENT_DATA_DIR",
            "JUPYTER_RUNTIME_DIR",
            "PYTHONNOUSERSITE",
            "MPLBACKEND",
        }
        assert "--cap-drop" in argv and argv[argv.index("--cap-drop") + 1] == "ALL"
        assert "--unshare-all" in argv and "--seccomp" in argv
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        raise


def test_the_users_server_cannot_read_another_projects_data(world):
    """Alice's server runs as her account with the groups the system gives it (as the spawner starts it)."""
    site, launcher, sock, users = world
    bobs_file = site.data_root / "card" / "dia" / "current" / "data.csv"
    code = f"""
        try:
            open({str(bobs_file)!r}).read()
            print("READ")
        except PermissionError as e:
            print("denied", e.errno)
    """
    for who in ("alice", "stranger"):
        pw = users[who]
        r = subprocess.run(
            [
                "setpriv",
                f"--reuid={pw.pw_uid}",
                f"--regid={pw.pw_gid}",
                "--init-groups",
                sys.executable,
                "-c",
                textwrap.dedent(code),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.stdout.split() == ["denied", "13"], (who, r.stdout, r.stderr)
    r = subprocess.run(
        [
            "setpriv",
            f"--reuid={users['bob'].pw_uid}",
            f"--regid={users['bob'].pw_gid}",
            "--init-groups",
            sys.executable,
            "-c",
            textwrap.dedent(code),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.stdout.split() == ["READ"], r.stderr


def test_the_server_as_the_spawner_starts_it_reads_no_dataset_not_even_its_own(world):
    """The spawner gives the server the workspace's group only: its data groups go to kernels only."""
    from paitient.hub.spawner import server_command

    site, launcher, sock, users = world
    own = site.data_root / "onc" / "bc" / "current" / "data.csv"
    code = f"""
        import os
        try:
            open({str(own)!r}).read()
            print("READ", os.getgroups())
        except PermissionError as e:
            print("denied", e.errno, os.getgroups())
    """
    alice = users["alice"]
    listen = ("127.0.0.1", random_port())
    command = [sys.executable, "-c", textwrap.dedent(code)]
    r = subprocess.run(
        server_command(alice.pw_name, [workspacegroup.gid()], listen, f"http://127.0.0.1:{random_port()}/api", command),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.stdout.split() == ["denied", "13", f"[{workspacegroup.gid()}]"], r.stderr
