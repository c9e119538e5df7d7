"""The world the attacks run in: two researchers on two projects, their real servers, the hub's secrets.

Alice (project ``onc``) and Bob (project ``card``) are real system accounts; each has a real server
started as that account from the spawner's config, so every kernel is a real bwrap sandbox. Stand-ins
listen where the hub, the proxy API and the directory would (loopback TCP, UDP, a unix socket, an
abstract socket), and the files an attacker wants (hub database, cookie secret, site configuration,
pseudonymisation key, registry) lie where a real install keeps them, some of them world-readable so that
only the sandbox, not file modes, can be what stops a read.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from paitient.registry import Registry
from tests import accounts, workspacegroup
from tests.server.harness import UserServer, make_site, publish

PRELUDE = r"""
import ctypes, errno, json, os, socket, subprocess
_libc = ctypes.CDLL(None, use_errno=True)
def _c(rv):
    if rv == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return rv
def _try(f):
    try:
        return {"ok": True, "value": repr(f())[:300]}
    except OSError as e:
        return {"ok": False, "errno": errno.errorcode.get(e.errno), "type": type(e).__name__, "msg": str(e)}
    except Exception as e:
        return {"ok": False, "errno": None, "type": type(e).__name__, "msg": str(e)}
def _report(f):
    print("@@" + json.dumps(_try(f)))
"""


def _free_account(prefix: str = "ptt") -> str:
    import secrets

    while True:
        name = f"{prefix}{secrets.token_hex(3)}"
        try:
            pwd.getpwnam(name)
        except KeyError:
            return name


@contextlib.contextmanager
def system_accounts(homes: Path, labels: list[str]):
    """Real accounts with private homes (like tests/conftest.py's make_system_user, for a whole session)."""
    made: list[str] = []
    try:
        for label in labels:
            name = _free_account()
            subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--no-user-group",
                    "--gid",
                    "nogroup",
                    "--groups",
                    str(workspacegroup.gid()),  # a member: it may reach the services' sockets
                    "--home-dir",
                    str(homes / name),
                    "--create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--comment",
                    f"paitient attack {label}",
                    name,
                ],
                check=True,
                capture_output=True,
            )
            made.append(name)
            os.chmod(homes / name, 0o700)
        yield [pwd.getpwnam(n) for n in made]
    finally:
        accounts.remove_all(made)


@dataclass
class Listeners:
    """Loopback stand-ins for the hub, proxy API, directory; they record whatever reaches them."""

    tcp: dict[str, socket.socket] = field(default_factory=dict)
    udp: socket.socket | None = None
    tcp6: socket.socket | None = None
    unix: socket.socket | None = None
    abstract: socket.socket | None = None
    abstract_name: str = ""

    def port(self, name: str) -> int:
        return self.tcp[name].getsockname()[1]

    def nothing_arrived(self) -> bool:
        for s in [*self.tcp.values(), self.tcp6, self.unix, self.abstract]:
            s.setblocking(False)
            try:
                conn, _ = s.accept()
            except BlockingIOError:
                continue
            conn.close()
            return False
        self.udp.setblocking(False)
        try:
            self.udp.recvfrom(65536)
        except BlockingIOError:
            return True
        return False

    def close(self) -> None:
        for s in [*self.tcp.values(), self.udp, self.tcp6, self.unix, self.abstract]:
            if s is not None:
                s.close()


@dataclass
class World:
    root: Path
    site: object
    alice: pwd.struct_passwd
    bob: pwd.struct_passwd
    server_a: UserServer
    server_b: UserServer
    listeners: Listeners
    secrets: dict[str, Path]
    hub_socket: Path


def _listeners(root: Path) -> Listeners:
    ls = Listeners()
    for name in ("hub", "proxy_api", "directory", "hub_api"):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        ls.tcp[name] = s
    ls.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ls.udp.bind(("127.0.0.1", 0))
    ls.tcp6 = socket.socket(socket.AF_INET6)
    ls.tcp6.bind(("::1", 0))
    ls.tcp6.listen(8)
    ls.unix = socket.socket(socket.AF_UNIX)
    hub_dir = root / "state" / "hub"
    hub_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(hub_dir, 0o755)
    ls.unix.bind(str(hub_dir / "hub.sock"))
    os.chmod(hub_dir / "hub.sock", 0o666)
    ls.unix.listen(8)
    ls.abstract_name = f"paitient-attack-{os.getpid()}"
    ls.abstract = socket.socket(socket.AF_UNIX)
    ls.abstract.bind("\0" + ls.abstract_name)
    ls.abstract.listen(8)
    return ls


def _plant_secrets(root: Path, site) -> dict[str, Path]:
    state = site.state_dir
    files = {
        "hub_db": (state / "hub" / "jupyterhub.sqlite", "SQLite format 3\0hub-db", 0o600),
        "cookie_secret": (state / "hub" / "jupyterhub_cookie_secret", "c0ffee" * 10, 0o600),
        "site_config": (root / "site.toml", "[workspace]\n# site secret marker\n", 0o644),
        "key": (site.key_file, "pseudonym-key-material", 0o600),
        "registry": (state / "accounts.json", "{}", 0o644),
    }
    out = {}
    for name, (path, text, mode) in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o755 if mode == 0o644 or path.parent == state / "hub" else 0o700)
        path.write_text(text)
        os.chmod(path, mode)
        out[name] = path
    return out


@contextlib.contextmanager
def audit_service(site):
    """The real audit service (root) on the site's run dir; stopped by its pid."""
    sock = site.run_dir / "audit.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "paitient.cli", "service", "audit", f"--state-dir={site.state_dir}"],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the audit service did not start")
            time.sleep(0.05)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


@pytest.fixture(scope="session")
def world():
    root = Path(tempfile.mkdtemp(prefix="pta-", dir="/tmp"))
    os.chmod(root, 0o755)
    homes = root / "h"  # short: kernel socket paths live under the homes
    homes.mkdir(mode=0o755)
    site = make_site(
        root,
        {"onc": ["bc", "gbsg"], "card": ["dia"]},
        sandbox={"memory_mb": 1024, "max_processes": 64, "max_open_files": 256, "cpu_seconds": 0},
        server={
            "output_cap_message_bytes": 100_000,
            "output_cap_execution_bytes": 400_000,
            "contents_cap_bytes": 1_000_000,
        },
    )
    bc_version = publish(site, "onc", "bc", "id,size\n1,2.5\n")
    publish(site, "onc", "gbsg", "id,time\n1,30\n")
    publish(site, "card", "dia", "id,glucose\nCARD-SECRET,7.1\n")
    secrets = _plant_secrets(root, site)
    listeners = _listeners(root)
    try:
        with system_accounts(homes, ["alice", "bob"]) as (alice, bob):
            # A dataset version that Alice's account could write on the host (a permissions slip):
            # only the read-only mount can stop her kernel from changing it.
            for p in (bc_version, bc_version / "data.csv"):
                os.chown(p, alice.pw_uid, alice.pw_gid)
            (Path(alice.pw_dir) / "notes.txt").write_text("alice's notes\n")
            os.chown(Path(alice.pw_dir) / "notes.txt", alice.pw_uid, alice.pw_gid)
            (Path(bob.pw_dir) / "bob-private.txt").write_text("bob's private file\n")
            os.chown(Path(bob.pw_dir) / "bob-private.txt", bob.pw_uid, bob.pw_gid)
            server_a = UserServer(site, alice, ("onc",), root, extra_env={"JUPYTERHUB_API_TOKEN": "hub-token-secret-a"})
            server_b = UserServer(site, bob, ("card",), root)
            registry = Registry.for_state_dir(site.state_dir)
            registry.put(server_a.member)
            registry.put(server_b.member)
            with audit_service(site), server_a, server_b:
                yield World(
                    root, site, alice, bob, server_a, server_b, listeners, secrets, root / "state" / "hub" / "hub.sock"
                )
    finally:
        listeners.close()
        shutil.rmtree(root, ignore_errors=True)


class Attacker:
    """Runs attack code in one kernel of a server and returns what it reported."""

    def __init__(self, server: UserServer):
        self.server = server
        self.kernel_id = server.start_kernel()
        res = server.run(PRELUDE, self.kernel_id)
        assert res.error is None, res

    def run(self, code: str):
        return self.server.run(code, self.kernel_id)

    def attempt(self, expr: str) -> dict:
        """Evaluate ``expr`` in the kernel; the outcome as {"ok", "errno", "type", "msg"}."""
        res = self.run(f"_report(lambda: {expr})")
        assert res.error is None, res
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("@@")][-1]
        return json.loads(line[2:])


@pytest.fixture(scope="session")
def alice_kernel(world) -> Attacker:
    return Attacker(world.server_a)
