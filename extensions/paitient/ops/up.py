"""``paitient up``, ``paitient status``, ``paitient stop``: run the workspace on one machine.

``up`` starts, in order, the directory (the embedded demo slapd when the site names none), the proxy, with
the docker spawner the container engine (podman's Docker API on a socket under ``<state_dir>/engine``, and
the single-user image when the engine lacks it), and the hub (which starts the services), all under one
state directory, then prints one line when sign-in works. It stays in the foreground; Ctrl-C (or ``paitient
stop``) stops researchers' servers, the hub, the proxy, the engine and the directory, each by the process id
it started. ``up`` again on the same state directory
resumes: directory, hub database, cookie secret, accounts and data are kept.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from traitlets import Bool, Float, Int, Unicode, default

from paitient.app import PaitientCommand
from paitient.config import SiteConfig, Workspace
from paitient.fsutil import atomic_write_json
from paitient.hub.engine import Engine, EngineError, image_tag
from paitient.hub.paths import HubPaths, default_proxy_command
from paitient.ops.commands import PROXY_TOKEN_ENV, hub_command, proxy_command, service_command
from paitient.services import PAGES, SERVICES
from paitient.services.kit.process import SEPARATE_PORTS, free_ports, parent_death_signal, token_secret

if TYPE_CHECKING:
    from paitient.ops.directory import DemoDirectory

READY_PREFIX = "paitient: workspace ready at "


def pid_alive(pid: int) -> bool:
    """True while the process runs (a zombie, exited but not yet reaped by its parent, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def pid_cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").decode(errors="replace").split("\0")
    except OSError:
        return []


def terminate(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM one process we started, SIGKILL after ``timeout``; reap it if it is our child."""
    if not pid_alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:
            if not pid_alive(pid):
                return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def hub_api(base_url: str, token: str, path: str, method: str = "GET", timeout: float = 5.0):
    req = urllib.request.Request(  # noqa: S310 - a loopback http URL built here
        base_url.rstrip("/") + "/hub/api" + path,
        method=method,
        headers={"Authorization": f"token {token}"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback URL we built
        body = r.read()
        return json.loads(body) if body else None


def proxy_routes(api_port: int, token: str) -> dict:
    """The routes configurable-http-proxy holds (its REST API on loopback)."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{api_port}/api/routes",  # noqa: S310 - loopback
        headers={"Authorization": f"token {token}"},
    )
    with urllib.request.urlopen(req, timeout=2) as r:  # noqa: S310
        return json.loads(r.read())


def stop_user_servers(base_url: str, token: str, timeout: float = 30.0) -> list[str]:
    """Ask the hub to stop every running user server; wait until they are gone. Returns the names."""
    users = hub_api(base_url, token, "/users?state=active") or []
    names = [u["name"] for u in users if u.get("servers")]
    for name in names:
        try:
            hub_api(base_url, token, f"/users/{urllib.parse.quote(name)}/server", method="DELETE", timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code not in (202, 204, 400):
                raise
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        users = hub_api(base_url, token, "/users?state=active") or []
        if not any(u.get("servers") for u in users):
            break
        time.sleep(0.3)
    return names


@dataclass
class Running:
    """What one `paitient up` runs; written to ``<state_dir>/up.json`` for status and stop."""

    up_pid: int
    url: str
    hub_port: int
    proxy_api_port: int
    directory_url: str
    pids: dict[str, int] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Running | None:
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None


def describe_demo_accounts(passwords: dict[str, str]) -> list[str]:
    from paitient.ops.demo import DEMO_PEOPLE

    lines = []
    for name, full_name, projects, steward in DEMO_PEOPLE:
        what = ("projects: " + ", ".join(projects)) if projects else "no project (sign-in is refused)"
        if steward:
            what = "data steward"
        lines.append(f"{name:<6} password {passwords.get(name, '?'):<14} {full_name}, {what}")
    return lines


class _StateCommand(PaitientCommand):
    port = Int(
        0, help=f"Public port of the workspace (overrides [workspace] port; default {Workspace.port.default_value})."
    ).tag(config=True)

    aliases = {**PaitientCommand.aliases, "port": "_StateCommand.port"}

    def overrides(self) -> dict[str, dict]:
        out = super().overrides()
        if self.port:
            out.setdefault("workspace", {})["port"] = self.port
        return out


SPAWNER_HELP = (
    'How researchers\' servers run (overrides [workspace] spawner): "local" (a process of their own account) or '
    '"docker" (a container of their own on the podman engine `up` starts and stops).'
)


class UpCommand(_StateCommand):
    name = "up"
    description = __doc__

    proxy_command = Unicode(help="The configurable-http-proxy executable.").tag(config=True)
    ready_timeout = Float(90.0, help="Seconds to wait for the hub to answer before giving up.").tag(config=True)
    engine_timeout = Float(30.0, help="Seconds to wait for the container engine to answer (docker spawner).").tag(
        config=True
    )
    spawner = Unicode("", help=SPAWNER_HELP).tag(config=True)
    podman = Unicode("podman", help="The podman executable that serves the docker spawner's engine.").tag(config=True)
    aliases = {**_StateCommand.aliases, "spawner": "UpCommand.spawner"}
    max_restarts = Int(5, help="Restarts of the hub, proxy or directory allowed per minute before giving up.").tag(
        config=True
    )

    separate_services = Bool(
        False,
        help="Run each root-side service as a process of its own, as the systemd units of `paitient install` do, "
        "instead of as the hub's managed services.",
    ).tag(config=True)
    flags = {
        "separate-services": (
            {"UpCommand": {"separate_services": True}},
            "Run each service as a process of its own, as `paitient install`'s units do.",
        )
    }

    @default("proxy_command")
    def _proxy_command_default(self) -> str:
        return default_proxy_command()

    def overrides(self) -> dict[str, dict]:
        out = super().overrides()
        if self.spawner:
            out.setdefault("workspace", {})["spawner"] = self.spawner
        return out

    def start(self) -> None:
        self.require_root()
        site = self.load_site()
        paths = HubPaths.of(site)
        paths.prepare()
        running = Running.read(paths.up_file)
        if running and pid_alive(running.up_pid) and running.up_pid != os.getpid():
            self.fail(
                f"a workspace already runs on {site.state_dir} (pid {running.up_pid}, {running.url}); "
                f"stop it first: paitient stop --state-dir={site.state_dir}"
            )
        if not os.access(self.proxy_command, os.X_OK):
            self.fail(f"the proxy {self.proxy_command} is not installed; run: bash scripts/setup install")
        self.children: dict[str, subprocess.Popen] = {}
        self.commands: dict[str, tuple[list[str], dict[str, str] | None]] = {}
        self.restarts: list[float] = []
        stopping = False

        def on_signal(signum, _frame):
            nonlocal stopping
            if not stopping:
                stopping = True
                raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.running: Running | None = None
        self.directory: DemoDirectory | None = None
        try:
            self._start_all(site, paths)
            self._watch(paths)
        except KeyboardInterrupt:
            print("paitient: stopping ...", flush=True)
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self._stop_all(paths)

    # -- start ----------------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], paths: HubPaths, env: dict[str, str] | None = None) -> None:
        log = open(paths.log_dir / f"{name}.log", "ab", buffering=0)  # noqa: SIM115 - child holds a dup
        try:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
                preexec_fn=parent_death_signal,
            )
        finally:
            log.close()
        self.children[name] = proc
        self.commands[name] = (argv, env)
        self.log.info("started %s (pid %d), log in %s", name, proc.pid, paths.log_dir / f"{name}.log")

    def _start_all(self, site: SiteConfig, paths: HubPaths) -> None:
        w = site.workspace
        directory_url = site.directory.url
        demo = None
        if site.directory.embedded:
            from paitient.ops.directory import DemoDirectory

            demo = DemoDirectory(site.state_dir, die_with_parent=True)
            demo.start()
            self.directory = demo
            directory_url = demo.url
        if site.directory.embedded:
            # Demo mode: the demo directory comes with demo data for its projects.
            from paitient.ops.demodata import publish_demo

            publish_demo(site)
        # Each project's data readable by its group only, the groups holding the registry's members
        # (also data published before the groups existed).
        from paitient.services.data import access

        orphans = access.sync(site)
        if orphans:
            self.log.warning(
                "data folders that name no project of the site were made root-only: %s", ", ".join(orphans)
            )
        # Chosen together, so that no two of them are the same (the hub and the proxy's API once were).
        ports = iter(free_ports(2 + len(SEPARATE_PORTS), avoid=(w.port, w.hub_port, w.proxy_api_port)))
        hub_port = w.hub_port or next(ports)
        proxy_api_port = w.proxy_api_port or next(ports)
        proxy_token = paths.secret("proxy_token")
        host = "127.0.0.1" if w.bind_ip in ("0.0.0.0", "::") else w.bind_ip
        url = f"http://{host}:{w.port}/"
        proxy = proxy_command(site, self.proxy_command, hub_port=hub_port, proxy_api_port=proxy_api_port)
        self._spawn("proxy", proxy.argv, paths, env={PROXY_TOKEN_ENV: proxy_token})
        if w.spawner == "paitient-docker":
            self._start_engine(site, paths)
        service_ports = None
        if self.separate_services:
            service_ports = {name: next(ports) for name in SEPARATE_PORTS}
            for name in SERVICES:
                paths.secret(token_secret(name))  # made once, before the hub and the service both read it
                command = service_command(site, name, hub_port=hub_port, port=service_ports.get(name, 0))
                self._spawn(f"service-{name}", command.argv, paths)
        hub = hub_command(
            site,
            directory_url=directory_url,
            hub_port=hub_port,
            proxy_api_port=proxy_api_port,
            service_ports=service_ports,
        )
        self._spawn("hub", hub.argv, paths)
        self.running = Running(
            up_pid=os.getpid(),
            url=url,
            hub_port=hub_port,
            proxy_api_port=proxy_api_port,
            directory_url=directory_url,
            pids=self._pids(),
        )
        atomic_write_json(paths.up_file, self.running.__dict__, mode=0o644)
        self._wait_ready(url, proxy_api_port, paths)
        print(f"{READY_PREFIX}{url}", flush=True)
        if w.subdomain_host:
            print(
                f"paitient: browsers open {w.subdomain_host}/ (the hub; each server and service on a subdomain)",
                flush=True,
            )
        if demo is not None:
            print("paitient: demo accounts (hospital directory, embedded):", flush=True)
            for line in describe_demo_accounts(demo.credentials()):
                print(f"  {line}", flush=True)
        print("paitient: Ctrl-C stops the workspace.", flush=True)

    def _start_engine(self, site: SiteConfig, paths: HubPaths) -> None:
        """podman's Docker API for the docker spawner, its storage under <state_dir>/engine; the image made
        when the engine lacks it. An engine that cannot start stops `up` with its reason."""
        engine = Engine(site.state_dir, podman=self.podman)
        try:
            engine.prepare()
            self._spawn("engine", engine.service_command(), paths, env=engine.env)
            engine.wait_ready(self.children["engine"], self.engine_timeout, paths.log_dir / "engine.log")
            if engine.ensure_image():
                self.log.info("made the single-user image %s", image_tag())
        except (EngineError, OSError, subprocess.SubprocessError) as e:
            raise SystemExit(f"paitient up: the container engine (docker spawner) cannot start: {e}") from None

    def _pids(self) -> dict[str, int]:
        """The process ids of what runs now: the embedded directory (while it runs), the proxy and the hub."""
        directory_pid = self.directory.pid if self.directory is not None else None
        own = {} if directory_pid is None else {"directory": directory_pid}
        return {**own, **{name: p.pid for name, p in self.children.items()}}

    def _wait_ready(self, url: str, proxy_api_port: int, paths: HubPaths) -> None:
        deadline = time.monotonic() + self.ready_timeout
        last = ""
        while time.monotonic() < deadline:
            for name, proc in self.children.items():
                if proc.poll() is not None:
                    raise SystemExit(
                        f"paitient up: {name} exited with code {proc.returncode} during start; "
                        f"see {paths.log_dir / (name + '.log')}"
                    )
            try:
                with urllib.request.urlopen(url + "hub/login", timeout=2) as r:  # noqa: S310 - loopback
                    hub_ok = r.status == 200
                # the hub adds its services' routes to the proxy last: ready means every page answers
                routes = proxy_routes(proxy_api_port, paths.secret("proxy_token"))
                # (by host too, "/<name>--service.HOST/services/<name>", where the site sets subdomain_host)
                missing = [
                    f"/services/{name}" for name in PAGES if not any(r.endswith(f"/services/{name}") for r in routes)
                ]
                if hub_ok and not missing:
                    return
                last = f"proxy has no route yet for {', '.join(missing)}" if missing else "hub not ready"
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = str(e)
            time.sleep(0.2)
        raise SystemExit(
            f"paitient up: the hub did not answer at {url} within {self.ready_timeout:.0f}s ({last}); "
            f"see {paths.log_dir / 'hub.log'}"
        )

    def _watch(self, paths: HubPaths) -> None:
        """Restart whatever exits unexpectedly (a hub restart keeps researchers' servers); give up when
        restarts come faster than :attr:`max_restarts` a minute."""
        while True:
            exited = [(name, proc.returncode) for name, proc in self.children.items() if proc.poll() is not None]
            if self.directory is not None and not self.directory.running:
                exited.append(("directory", None))
            for name, code in exited:
                now = time.monotonic()
                self.restarts = [t for t in self.restarts if now - t < 60] + [now]
                if len(self.restarts) > self.max_restarts:
                    print(
                        f"paitient: {name} keeps exiting (code {code}); stopping the workspace; see {paths.log_dir}",
                        file=sys.stderr,
                        flush=True,
                    )
                    return
                print(f"paitient: {name} exited (code {code}); restarting it", file=sys.stderr, flush=True)
                if name == "directory":
                    assert self.directory is not None  # "directory" is in exited only when one was started
                    self.directory.start()
                else:
                    argv, env = self.commands[name]
                    self._spawn(name, argv, paths, env)
                assert self.running is not None  # _start_all() sets it before _watch() runs
                self.running.pids = self._pids()
                atomic_write_json(paths.up_file, self.running.__dict__, mode=0o644)
            time.sleep(0.5)

    # -- stop -----------------------------------------------------------------------------------------

    def _stop_all(self, paths: HubPaths) -> None:
        hub = self.children.get("hub")
        if self.running and hub is not None and hub.poll() is None:
            try:
                names = stop_user_servers(f"http://127.0.0.1:{self.running.hub_port}/", paths.secret("operator_token"))
                if names:
                    self.log.info("stopped the servers of %s", ", ".join(names))
            except (urllib.error.URLError, OSError, ValueError) as e:
                print(
                    f"paitient: could not stop user servers through the hub ({e}); "
                    "they keep running until the next `paitient up` stops them",
                    file=sys.stderr,
                )
        services = [name for name in self.children if name.startswith("service-")]
        # the engine after the hub: the hub stops the servers' containers through it
        for name in ("hub", *services, "proxy", "engine"):
            proc = self.children.get(name)
            if proc is not None:
                terminate(proc.pid)
        if "engine" in self.children:
            left = Engine(paths.state_dir).release_mounts()
            if left:
                print(f"paitient: the container engine left mounts: {', '.join(left)}", file=sys.stderr)
        if self.directory is not None:
            self.directory.stop()
        try:
            paths.up_file.unlink()
        except FileNotFoundError:
            pass
        print("paitient: stopped.", flush=True)


class StatusCommand(_StateCommand):
    name = "status"
    description = "Show whether a workspace runs on the state directory: URL, and each process with its pid."

    def start(self) -> None:
        site = self.load_site()
        paths = HubPaths.of(site)
        running = Running.read(paths.up_file)
        if running is None or not pid_alive(running.up_pid):
            print(f"paitient: no workspace runs on {site.state_dir}")
            self.exit(3)
        print(f"paitient: workspace at {running.url} (paitient up: pid {running.up_pid})")
        for name, pid in running.pids.items():
            print(f"  {name:<10} pid {pid:<8} {'running' if pid_alive(pid) else 'NOT RUNNING'}")
        try:
            users = hub_api(
                f"http://127.0.0.1:{running.hub_port}/", paths.secret("operator_token"), "/users?state=active"
            )
            active = [u["name"] for u in users if u.get("servers")]
            print(f"  servers    {len(active)} running" + (f": {', '.join(active)}" if active else ""))
        except (urllib.error.URLError, OSError) as e:
            print(f"  hub API    not answering ({e})")


class StopCommand(_StateCommand):
    name = "stop"
    description = "Stop the workspace that `paitient up` runs on the state directory (it stops what it started)."

    timeout = Float(60.0, help="Seconds to wait for `paitient up` to finish stopping.").tag(config=True)

    def start(self) -> None:
        self.require_root()
        site = self.load_site()
        paths = HubPaths.of(site)
        running = Running.read(paths.up_file)
        if running is None or not pid_alive(running.up_pid):
            print(f"paitient: no workspace runs on {site.state_dir}")
            return
        if "paitient" not in " ".join(pid_cmdline(running.up_pid)):
            self.fail(
                f"pid {running.up_pid} in {paths.up_file} is not a paitient process; "
                "remove the stale file and stop the processes by hand"
            )
        os.kill(running.up_pid, signal.SIGTERM)
        deadline = time.monotonic() + self.timeout
        while pid_alive(running.up_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_alive(running.up_pid):
            self.fail(f"paitient up (pid {running.up_pid}) did not stop within {self.timeout:.0f}s")
        print("paitient: stopped.")
