"""A real workspace for end-to-end tests: `paitient up` in a subprocess, driven like a browser would.

``Workspace.start(root)`` writes a site configuration (the demo projects and the embedded demo directory,
accounts under a test prefix and a private home root), runs ``paitient up`` on a free port, and waits for
its ready line. ``login`` signs in through the hub's login form, ``browser_login`` does it from the
workspace's address and follows wherever the hub sends a browser, ``start_server`` spawns the user's
server, ``run_cell`` executes code in a real kernel over the kernel websocket. ``stop`` stops the
workspace through ``paitient stop`` and removes the system accounts it created.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import requests

from paitient.config import EMBEDDED_SITE
from paitient.hub.paths import SERVER_MODULE
from paitient.registry import Registry
from paitient.services.kit.process import free_port
from tests import accounts, logtails
from tests.kernelclient import CellResult, execute

PAITIENT = [sys.executable, "-m", "paitient.cli"]
STARTED_LINE = "paitient: Ctrl-C stops the workspace."
"""The last line `paitient up` prints at start, after the ready line and the demo accounts."""


def site_toml(
    state_dir: Path,
    home_root: Path,
    port: int,
    prefix: str,
    extra: str = "",
    project_settings: dict[str, str] | None = None,
    subdomains: bool = False,
) -> str:
    """The demo site with test paths: same directory layout and projects, private state and homes; with
    ``subdomains``, every server and service on a subdomain of ``localhost`` (browsers resolve ``*.localhost``
    to loopback themselves)."""
    origins = f'\nsubdomain_host = "http://localhost:{port}"' if subdomains else ""
    body = EMBEDDED_SITE.read_text().replace(
        'state_dir = "/var/lib/paitient"', f'state_dir = "{state_dir}"\nport = {port}{origins}'
    )
    for project, lines in (project_settings or {}).items():
        name = f'name = "{project}"\n'
        assert body.count(name) == 1, f"the demo site has no project {project}"
        body = body.replace(name, name + lines.strip() + "\n")
    accounts_table = f'\n[accounts]\nprefix = "{prefix}"\nhome_root = "{home_root}"\n'
    workers = f'\n[jobs]\naccount = "{prefix}-jobs"\n\n[airlock]\naudit_account = "{prefix}-audit"\n'
    # The shared e2e workspace's few accounts hold the kernels of every module that uses them (a module's
    # fixture keeps its kernel for all its tests), more than the default limit a researcher has at once.
    kernels = "\n[sandbox]\nkernels_per_account = 32\n"
    return body + accounts_table + workers + kernels + extra


@contextlib.contextmanager
def own_workspace(
    dir_prefix: str,
    account_prefix: str = "ptt",
    *,
    start: bool = True,
    extra_site: str = "",
    project_settings: dict[str, str] | None = None,
    up_args: tuple[str, ...] = (),
    subdomains: bool = False,
) -> Iterator[Workspace]:
    """A workspace in a fresh directory under /tmp (traversable by the spawned accounts), started unless
    ``start`` is false; stopped, its accounts removed and its directory deleted afterwards. ``extra_site`` is
    TOML appended to the site file (e.g. an ``[egress]`` section); ``project_settings`` adds TOML lines to
    a demo project's table, by project name; ``up_args`` are given to `paitient up` only; ``subdomains``: see
    :func:`site_toml`."""
    root = Path(tempfile.mkdtemp(prefix=dir_prefix, dir="/tmp"))
    os.chmod(root, 0o755)  # spawned accounts traverse it to reach their homes and the service sockets
    ws = Workspace(
        root,
        prefix=account_prefix,
        extra_site=extra_site,
        project_settings=project_settings,
        up_args=up_args,
        subdomains=subdomains,
    )
    try:
        if start:
            ws.start()
        yield ws
    finally:
        ws.stop()
        shutil.rmtree(root, ignore_errors=True)


class Workspace:
    def __init__(
        self,
        root: Path,
        prefix: str = "ptt",
        extra_site: str = "",
        project_settings: dict[str, str] | None = None,
        up_args: tuple[str, ...] = (),
        subdomains: bool = False,
    ):
        self.root = root
        self.up_args = up_args
        self.state_dir = root / "state"
        self.home_root = root / "homes"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.browser_url = f"http://localhost:{self.port}/" if subdomains else self.url
        """Where a browser opens the workspace (the hub's origin)."""
        self.site_file = root / "site.toml"
        self.prefix = prefix
        self.site_file.write_text(
            site_toml(self.state_dir, self.home_root, self.port, prefix, extra_site, project_settings, subdomains)
        )
        os.chmod(self.site_file, 0o644)
        self.proc: subprocess.Popen | None = None
        self.output: list[str] = []

    # -- lifecycle --------------------------------------------------------------------------------------

    def args(self) -> list[str]:
        return [f"--site={self.site_file}"]

    def start(self, timeout: float = 120.0) -> Workspace:
        logtails.watch(self, lambda: (self.state_dir / "logs").glob("*.log"))
        self.proc = subprocess.Popen(
            [*PAITIENT, "up", *self.args(), *self.up_args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("paitient up exited before it was ready:\n" + "".join(self.output) + self.logs())
            self.output.append(line)
            if line.startswith(STARTED_LINE):
                # the ready line and the credential lines came before this one; keep draining in the background
                self._drain()
                return self
        raise RuntimeError(f"paitient up not ready within {timeout}s:\n" + "".join(self.output) + self.logs())

    def _drain(self) -> None:
        import threading

        def run():
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)

        threading.Thread(target=run, daemon=True).start()

    def logs(self) -> str:
        out = []
        for name in ("hub", "proxy"):
            p = self.state_dir / "logs" / f"{name}.log"
            if p.exists():
                tail = p.read_text(errors="replace").splitlines()[-40:]
                out.append(f"\n--- {name}.log (tail) ---\n" + "\n".join(tail))
        return "".join(out)

    def stop(self, remove_accounts: bool = True) -> None:
        logtails.unwatch(self)
        if self.proc is not None and self.proc.poll() is None:
            subprocess.run([*PAITIENT, "stop", *self.args()], capture_output=True, timeout=90)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if remove_accounts:
            self.remove_accounts()
            self.remove_groups()

    def directory_modify(self, ldif: str) -> None:
        """Change the running demo directory as its root DN (as the hospital's directory admins would)."""
        from paitient.ops.directory import DemoDirectory

        conf = str(DemoDirectory(self.state_dir).conf_path)
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            if argv[:1] == ["slapd"] and conf in argv:
                url = argv[argv.index("-h") + 1]
                break
        else:
            raise AssertionError("the workspace's directory is not running" + self.logs())
        directory = DemoDirectory(self.state_dir)
        subprocess.run(
            ["ldapmodify", "-x", "-H", url, "-D", directory.rootdn, "-y", str(directory.rootpw_file)],
            input=ldif.encode(),
            check=True,
            capture_output=True,
        )

    def remove_accounts(self) -> None:
        """Every account the workspace made (its record), those its registry names, and the workers'."""
        from paitient.sysaccounts import AccountRecord

        recorded = [m.account for m in AccountRecord(self.state_dir).all()] if self.state_dir.exists() else []
        registered = [member.account for member in Registry.for_state_dir(self.state_dir).all()]
        workers = [f"{self.prefix}-jobs", f"{self.prefix}-audit"]  # made at their first use
        accounts.remove_all(dict.fromkeys([*recorded, *registered, *workers]))

    def remove_groups(self) -> None:
        """The projects' groups the workspace made (its record), after their members' accounts are gone."""
        record = self.state_dir / "project-groups.json"
        if record.exists():
            for name in json.loads(record.read_text()):
                subprocess.run(["groupdel", name], capture_output=True)

    # -- people ---------------------------------------------------------------------------------------

    def password(self, user: str) -> str:
        return json.loads((self.state_dir / "directory" / "demo-credentials.json").read_text())[user]

    def member(self, user: str):
        return Registry.for_state_dir(self.state_dir).by_username(user)

    def server_pid(self, user: str) -> int:
        """The pid of ``user``'s server process (run as their account), seen from the host."""
        uid = pwd.getpwnam(self.member(user).account).pw_uid
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and proc.stat().st_uid == uid:
                    if SERVER_MODULE.encode() in (proc / "cmdline").read_bytes():
                        return int(proc.name)
            except OSError:
                continue
        raise AssertionError(f"no server process of {user}")

    def login(self, user: str, password: str | None = None) -> requests.Session:
        """Sign in through the login form; raise with the page text if it is refused."""
        s = requests.Session()
        args, kwargs = self.login_form(s, user, password if password is not None else self.password(user))
        r = s.post(*args, **kwargs)
        if "/hub/login" in r.url:
            raise PermissionError(f"sign-in refused for {user!r}: {login_error(r.text)}")
        return s

    def login_form(self, s: requests.Session, user: str, password: str):
        r = s.get(self.url + "hub/login", timeout=10)
        r.raise_for_status()
        xsrf = re.search(r'name="_xsrf" value="([^"]+)"', r.text)
        data = {"username": user, "password": password}
        if xsrf:
            data["_xsrf"] = xsrf.group(1)
        return (self.url + "hub/login?next=%2Fhub%2Fhome",), {"data": data, "timeout": 30}

    def browser_login(self, user: str, password: str | None = None, timeout: float = 90.0) -> Visit:
        """Open the workspace's address and sign in through the form, following every redirect as a
        browser does; on the server's progress page, load it again until it sends on (the page reloads
        itself when the server is ready). Returns the session and every URL passed through."""
        s = requests.Session()
        r = s.get(self.url, timeout=10)
        visited = [h.url for h in r.history] + [r.url]
        form = re.search(r'<form[^>]*action="([^"]+)"[^>]*method="post"', r.text)
        if form is None:
            raise RuntimeError(f"no login form at {r.url}: {r.text[:300]}")
        xsrf = re.search(r'name="_xsrf" value="([^"]+)"', r.text)
        data = {"username": user, "password": password if password is not None else self.password(user)}
        if xsrf:
            data["_xsrf"] = xsrf.group(1)
        r = s.post(urljoin(r.url, html.unescape(form.group(1))), data=data, timeout=timeout)
        visited += [h.url for h in r.history] + [r.url]
        if "/hub/login" in r.url:
            raise PermissionError(f"sign-in refused for {user!r}: {login_error(r.text)}")
        deadline = time.monotonic() + timeout
        while "/hub/spawn-pending/" in r.url and time.monotonic() < deadline:
            time.sleep(0.5)
            r = s.get(r.url, timeout=timeout)
            visited += [h.url for h in r.history] + [r.url]
        return Visit(s, r, visited)

    def start_server(self, s: requests.Session, user: str, timeout: float = 90.0) -> None:
        r = s.get(self.url + f"hub/spawn/{user}", timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # A page request, as a browser makes it: the server sends it through the hub's OAuth, which
            # leaves the server's own cookie in the session for the API calls that follow.
            r = s.get(self.url + f"user/{user}/lab", timeout=10)
            if r.status_code == 200 and r.url.startswith(self.url + f"user/{user}/lab"):
                return
            time.sleep(0.3)
        raise RuntimeError(f"server of {user} not ready: {r.status_code} {r.text[:300]}" + self.logs())

    def xsrf_headers(self, s: requests.Session, user: str) -> dict[str, str]:
        token = s.cookies.get("_xsrf", path=f"/user/{user}/") or s.cookies.get("_xsrf")
        return {"X-XSRFToken": token} if token else {}

    def api(self, s: requests.Session, user: str, method: str, path: str, **kw) -> requests.Response:
        headers = {**self.xsrf_headers(s, user), **kw.pop("headers", {})}
        return s.request(method, self.url + f"user/{user}/api/{path}", headers=headers, timeout=60, **kw)

    # -- kernels --------------------------------------------------------------------------------------

    def start_kernel(self, s: requests.Session, user: str, name: str | None = None) -> str:
        body = {"name": name} if name else {}
        r = self.api(s, user, "POST", "kernels", json=body)
        if r.status_code != 201:
            raise RuntimeError(f"kernel start refused: {r.status_code} {r.text[:500]}")
        return r.json()["id"]

    def run_cell(
        self,
        s: requests.Session,
        user: str,
        code: str,
        kernel_id: str | None = None,
        timeout: float = 120.0,
        *,
        stdin_reply: str | None = None,
    ) -> CellResult:
        if kernel_id is not None:
            return asyncio.run(self._execute(s, user, kernel_id, code, timeout, stdin_reply))
        # a kernel for this cell only, shut down after it
        once = self.start_kernel(s, user)
        try:
            return asyncio.run(self._execute(s, user, once, code, timeout, stdin_reply))
        finally:
            self.api(s, user, "DELETE", f"kernels/{once}")

    def kernel_url(self, s: requests.Session, user: str, kernel_id: str) -> tuple[str, dict[str, str]]:
        """The kernel's websocket URL and the headers a browser would send with it."""
        cookie = "; ".join(f"{c.name}={c.value}" for c in s.cookies)
        url = self.url.replace("http://", "ws://") + f"user/{user}/api/kernels/{kernel_id}/channels"
        return url, {"Cookie": cookie, **self.xsrf_headers(s, user)}

    async def _execute(
        self, s: requests.Session, user: str, kernel_id: str, code: str, timeout: float, stdin_reply: str | None
    ) -> CellResult:
        url, headers = self.kernel_url(s, user, kernel_id)
        return await execute(url, headers, user, code, timeout, stdin_reply=stdin_reply)


@dataclass
class Visit:
    """Where a browser-like session ended (``page``) and the URLs it passed through on the way."""

    session: requests.Session
    page: requests.Response
    visited: list[str]


def mapped_packages(pid: int) -> set[str]:
    """The installed packages whose compiled modules process ``pid`` has loaded (from /proc/PID/maps): a view
    into what a running process imported, for packages that ship compiled modules."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return set(re.findall(r"/site-packages/([A-Za-z0-9_]+)/\S*\.so\b", maps))


def login_error(html: str) -> str:
    m = re.search(r'class="login_error[^"]*"[^>]*>(.*?)</', html, re.S)
    return re.sub(r"\s+", " ", m.group(1)).strip() if m else html[-300:]
