"""A real user server without the hub: the config the spawner writes, the server as the user's account.

``UserServer`` writes the root-owned config with :func:`paitient.hub.serverconfig.write_user_server_config`,
starts ``python -I -m jupyter_server`` under ``setpriv`` as a real system account with the environment
the spawner gives it, and talks to it over HTTP and the kernel websocket like a browser does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from paitient.config import SiteConfig, parse
from paitient.hub.serverconfig import user_server_env, write_user_server_config
from paitient.registry import Member, Registry
from paitient.services.kit.process import free_port
from tests import logtails, workspacegroup
from tests.kernelclient import CellResult, execute

PYTHON = sys.executable


def make_site(root: Path, projects: dict[str, list[str]], **sections: dict[str, Any]) -> SiteConfig:
    """A site under ``root`` (state and data root-owned, world-readable like a real install)."""
    state = root / "state"
    for d in (state, state / "run", state / "data"):
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)
    raw: dict[str, Any] = {
        "workspace": {"state_dir": str(state)},
        "projects": [{"name": p, "group": f"cn={p}", "datasets": ds} for p, ds in projects.items()],
        **sections,
    }
    return parse(raw)


def publish(site: SiteConfig, project: str, dataset: str, text: str, version: int = 1) -> Path:
    """A published dataset version as the ingest part lays it out, with ``current`` pointing at it, and its
    row-detection index built (root-only, as publication builds it). ``text`` is the table as CSV; it is kept
    as ``data.csv`` beside ``data.parquet`` so kernels can read it either way."""
    import io

    import pandas as pd

    from paitient.services.data import rowindex

    base = site.data_root / project / dataset
    vdir = base / "versions" / str(version)
    vdir.mkdir(parents=True, exist_ok=True)
    (vdir / "data.csv").write_text(text)
    pd.read_csv(io.StringIO(text)).to_parquet(vdir / "data.parquet")
    (vdir / "manifest.json").write_text(json.dumps({"version": version}))
    for d in (site.data_root / project, base, base / "versions", vdir):
        os.chmod(d, 0o755)
    cur = base / "current"
    if cur.is_symlink():
        cur.unlink()
    cur.symlink_to(f"versions/{version}")
    rowindex.reindex_version(site, project, dataset, version, rowindex.ensure_key(site))
    return vdir


@contextlib.contextmanager
def service_process(name: str, sock: Path, *args: str, log_path: Path):
    """``paitient service NAME ARGS`` as a real root process, yielded once its socket ``sock`` exists;
    stopped by its pid (SIGTERM, then SIGKILL). Its stderr goes to ``log_path``, a file, not a pipe nobody
    reads: it never fills up."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "paitient.cli", "service", name, *args], stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {name} service did not start: {log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def root_service(site: SiteConfig, name: str, sock: Path):
    """``paitient service NAME`` on the site (written to a file the service reads its projects from)."""
    from paitient.config.reference import effective_toml

    site_file = site.state_dir / f"{name}-site.toml"
    site_file.write_text(effective_toml(site))
    with service_process(name, sock, f"--site={site_file}", log_path=site.state_dir / f"{name}-service.log") as proc:
        yield proc


@contextlib.contextmanager
def egress_service(site: SiteConfig):
    """``paitient service egress`` as a real root process on the site's state dir; stopped by its pid."""
    from paitient.services.egress import socket_path

    with root_service(site, "egress", socket_path(site)) as proc:
        yield proc


@contextlib.contextmanager
def launcher_service(site: SiteConfig):
    """``paitient service launcher`` as a real root process: it starts the servers' kernels."""
    from paitient.services.launcher import socket_path

    with root_service(site, "launcher", socket_path(site)) as proc:
        yield proc


@contextlib.contextmanager
def audit_service(site: SiteConfig):
    """``paitient service audit`` as a real root process on the site's state dir; stopped by its pid."""
    with service_process(
        "audit",
        site.run_dir / "audit.sock",
        f"--state-dir={site.state_dir}",
        log_path=site.state_dir / "audit-service.log",
    ) as proc:
        yield proc


def _egress_socket(site: SiteConfig) -> Path:
    from paitient.services.egress import socket_path

    return socket_path(site)


def _launcher_socket(site: SiteConfig) -> Path:
    from paitient.services.launcher import socket_path

    return socket_path(site)


SERVICES: dict[str, tuple[Callable[[SiteConfig], Any], Callable[[SiteConfig], Path]]] = {
    "egress": (egress_service, _egress_socket),  # the gate asks it about every output
    "audit": (audit_service, lambda site: site.run_dir / "audit.sock"),  # a cell runs only once recorded
    "launcher": (launcher_service, _launcher_socket),  # it starts the servers' kernels
}
"""The root services a user's server needs: how to start each, and the socket it answers on."""


class Shared:
    """One root service of :data:`SERVICES` per site for the servers of a test: started by the first server
    that needs it (unless the test runs its own on that socket), stopped by its pid when the last one stops."""

    running: dict[str, Shared] = {}

    def __init__(self, site: SiteConfig, name: str):
        self.site, self.key = site, f"{name}:{site.state_dir}"
        self.users = 0
        self._context: Any = None
        service, socket = SERVICES[name]
        if not socket(site).exists():
            self._context = service(site)
            self._context.__enter__()

    @classmethod
    def acquire(cls, site: SiteConfig, name: str) -> Shared:
        key = f"{name}:{site.state_dir}"
        shared = cls.running.get(key)
        if shared is None:
            shared = cls.running[key] = cls(site, name)
        shared.users += 1
        return shared

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self.running.pop(self.key, None)
            if self._context is not None:
                self._context.__exit__(None, None, None)


class UserServer:
    """One user's server, started as the user's account from the config the spawner would write."""

    def __init__(
        self,
        site: SiteConfig,
        user: pwd.struct_passwd,
        projects: tuple[str, ...],
        base: Path,
        extra_env: dict[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
        *,
        start_egress: bool = True,
        start_audit: bool = True,
    ):
        """``start_egress``: start the site's egress service with the first server (off when the test runs its
        own on the site's gate socket)."""
        self.site = site
        self.start_egress = start_egress
        self.start_audit = start_audit
        self.audit: Shared | None = None
        self.user = user
        self.member = Member(username=user.pw_name, account=user.pw_name, uid=user.pw_uid, projects=projects)
        jdir = site.state_dir / "users" / user.pw_name / "jupyter"
        self.config_dir, self.data_dir = jdir / "config", jdir / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_hex(16)
        self.log_path = base / f"server-{user.pw_name}.log"
        self.extra_env = extra_env or {}
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None
        self.egress: Shared | None = None
        self.launcher: Shared | None = None

    def env(self) -> dict[str, str]:
        home = self.user.pw_dir
        return {
            "PATH": f"{Path(PYTHON).parent}:/usr/bin:/bin",
            "HOME": home,
            "USER": self.user.pw_name,
            "LANG": "C.UTF-8",
            **user_server_env(self.config_dir, self.data_dir, home),
            **self.extra_env,
        }

    def start(self, timeout: float = 60.0) -> UserServer:
        for d in (self.site.state_dir / "users", self.config_dir.parent.parent, self.config_dir.parent):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o755)
        # What the spawner does before a server starts: the registry knows the account (the services identify
        # its processes by uid), the site's egress service runs (the gate asks it about every output), its
        # audit service (a cell runs once recorded) and its launcher (which starts the kernels).
        Registry.for_state_dir(self.site.state_dir).put(self.member)
        if self.egress is None and self.start_egress:
            self.egress = Shared.acquire(self.site, "egress")
        if self.audit is None and self.start_audit:
            self.audit = Shared.acquire(self.site, "audit")
        if self.launcher is None:
            self.launcher = Shared.acquire(self.site, "launcher")
        write_user_server_config(self.site, self.member, self.config_dir, self.data_dir)
        cmd = [
            "setpriv",
            f"--reuid={self.user.pw_uid}",
            f"--regid={self.user.pw_gid}",
            # as the spawner starts it: the workspace's group only, no project group (the launcher gives the
            # kernels theirs)
            workspacegroup.setpriv_groups(),
            "--",
            PYTHON,
            "-I",
            "-m",
            "jupyter_server",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            "--ServerApp.open_browser=False",
            f"--IdentityProvider.token={self.token}",
            *self.extra_args,
        ]
        logtails.watch(self, lambda: [self.log_path, *self.site.state_dir.glob("*-service.log")])
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT, cwd=self.user.pw_dir, start_new_session=True
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()  # gives back the shared services
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            with contextlib.suppress(requests.RequestException):
                if self.get("/api/status").status_code == 200:
                    return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server did not answer within {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        logtails.unwatch(self)
        try:
            if self.proc is None or self.proc.poll() is not None:
                return
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        finally:
            if self.egress is not None:
                self.egress.release()
                self.egress = None
            if self.audit is not None:
                self.audit.release()
                self.audit = None
            if self.launcher is not None:
                self.launcher.release()
                self.launcher = None

    def __enter__(self) -> UserServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP ------------------------------------------------------------------------------------

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        headers = {"Authorization": f"token {self.token}", **kw.pop("headers", {})}
        return requests.request(method, self.url + path, headers=headers, timeout=60, allow_redirects=False, **kw)

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.request("GET", path, **kw)

    def start_kernel(self, name: str | None = None, **body: Any) -> str:
        if name is not None:
            body["name"] = name
        r = self.request("POST", "/api/kernels", json=body)
        if r.status_code != 201:
            raise RuntimeError(f"kernel start refused: {r.status_code} {r.text[:500]}\n{self.logs()}")
        return r.json()["id"]

    def kernel_pids(self) -> list[int]:
        """Processes of the server's account other than the server (the sandboxes, as the host sees them)."""
        out = subprocess.run(["pgrep", "-u", str(self.user.pw_uid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split() if self.proc and int(p) != self.proc.pid]

    def lasting_kernel_pids(self, settle: float = 0.5, tries: int = 20) -> list[int]:
        """The account's processes that stay: two readings ``settle`` seconds apart that agree.

        A single reading can catch a process that lives for a moment (a helper the kernel's Python starts
        and ends); comparing such readings made the interrupt test fail now and then.
        """
        last = sorted(self.kernel_pids())
        for _ in range(tries):
            time.sleep(settle)
            now = sorted(self.kernel_pids())
            if now == last:
                return now
            last = now
        raise AssertionError(f"the account's processes did not settle in {settle * tries:.0f} s: {last}")

    def run(
        self,
        code: str,
        kernel_id: str | None = None,
        timeout: float = 90.0,
        *,
        v1: bool = False,
        channel: str = "shell",
        stdin_reply: str | None = None,
        user_expressions: dict[str, str] | None = None,
        msg_id: str | None = None,
    ) -> CellResult:
        """Execute ``code`` over the kernel websocket: the legacy JSON protocol, or (``v1``) the binary
        protocol JupyterLab speaks; ``channel`` is where the execute_request goes; ``stdin_reply`` answers
        ``input()``; ``user_expressions`` and ``msg_id`` go with the request. Without ``kernel_id``, in a
        kernel for this cell only, shut down after it (as the e2e workspace's ``run_cell``)."""
        args = (code, timeout, v1, channel, stdin_reply, user_expressions, msg_id)
        if kernel_id is not None:
            return asyncio.run(self._execute(kernel_id, *args))
        once = self.start_kernel()
        try:
            return asyncio.run(self._execute(once, *args))
        finally:
            self.request("DELETE", f"/api/kernels/{once}")

    async def _execute(
        self,
        kernel_id: str,
        code: str,
        timeout: float,
        v1: bool = False,
        channel: str = "shell",
        stdin_reply: str | None = None,
        user_expressions: dict[str, str] | None = None,
        msg_id: str | None = None,
    ) -> CellResult:
        url = f"ws://127.0.0.1:{self.port}/api/kernels/{kernel_id}/channels"
        try:
            return await execute(
                url,
                {"Authorization": f"token {self.token}"},
                self.user.pw_name,
                code,
                timeout,
                v1=v1,
                channel=channel,
                stdin_reply=stdin_reply,
                user_expressions=user_expressions,
                msg_id=msg_id,
            )
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n{self.logs()}") from None
