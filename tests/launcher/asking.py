"""Asking a launcher for a kernel as a real account, over its real socket: shared by the host's and the pod's
launcher tests. Each request is sent by a process of that account (a launcher knows its caller only from the
socket's peer credentials)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from paitient.rules.sandbox import user_runtime_dir
from tests import workspacegroup

ASK = """
import json, sys
from paitient import channel
try:
    op = sys.argv[3] if len(sys.argv) > 3 else "start"
    print(json.dumps({"ok": channel.call(sys.argv[1], op, json.loads(sys.argv[2]), timeout=60)}))
except channel.ChannelError as e:
    print(json.dumps({"error": str(e), "code": e.code}))
"""


def ask_as(pw, sock: Path, args: dict, groups: str | None = None, op: str = "start") -> dict:
    """``op`` with ``args``, sent by a process of ``pw``'s account (``None``: root) with ``groups`` (a
    setpriv option; default: the workspace's group only, as the user's server has)."""
    groups = groups or workspacegroup.setpriv_groups()
    prefix = [] if pw is None else ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", groups]
    r = subprocess.run(
        [*prefix, sys.executable, "-c", textwrap.dedent(ASK), str(sock), json.dumps(args), op],
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


def sandbox_of(pid: int, timeout: float = 20.0) -> tuple[int, list[str]]:
    """The bwrap process under the kernel's keeper ``pid`` (its pid and command line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            argv = [a.decode() for a in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0") if a]
            if argv and argv[0].endswith("bwrap"):
                return int(child), argv
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} never started bwrap")


def asking(pw, sock: Path, args: dict) -> subprocess.Popen:
    """A process of ``pw`` that asks ``start`` with ``args``, prints the answer as one line and stays (as a
    server does) until its stdin is closed."""
    code = ASK + "sys.stdout.flush()\nsys.stdin.read()\n"
    return subprocess.Popen(
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


@contextlib.contextmanager
def staying(pw, sock: Path, args: dict):
    """``start`` asked by a process of ``pw`` that stays (as a server does) until the block ends."""
    proc = asking(pw, sock, args)
    try:
        yield proc, json.loads(proc.stdout.readline())
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
