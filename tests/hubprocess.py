"""A real JupyterHub (with the proxy it starts) for tests that need one without the whole workspace.

A test gives the lines of its own ``jupyterhub_config.py`` (authenticator, services, roles); :func:`running_hub`
puts in front of them the loopback addresses, free ports, the proxy, and the hub's files in ``hub_dir``, starts
the hub, waits until ``ready`` answers as expected, and at the end stops the hub (which stops its managed
services and its proxy) and the proxy by its pid should it outlive the hub. In the config lines, ``s`` is the
settings dict (the test's extras included) and ``c`` the config. :func:`failed_hub` starts a hub that is to
exit at its start and waits for that instead.

The hub is JupyterHub's own (``python -m jupyterhub``) unless ``command`` names another, such as
:func:`paitient_hub`, the hub class that ``paitient up`` runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import requests

from paitient.services.kit.process import free_port

PRELUDE = """import json
s = json.loads({settings!r})
c = get_config()
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = s["port"]
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = s["hub_port"]
c.ConfigurableHTTPProxy.command = [s["proxy"]]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:%d" % s["proxy_api_port"]
c.ConfigurableHTTPProxy.pid_file = s["dir"] + "/proxy.pid"
c.JupyterHub.db_url = "sqlite:///" + s["dir"] + "/hub.sqlite"
c.JupyterHub.cookie_secret_file = s["dir"] + "/cookie_secret"
c.JupyterHub.pid_file = s["dir"] + "/hub.pid"
"""


STOCK_HUB = [sys.executable, "-m", "jupyterhub"]
"""JupyterHub's own hub; the config file's arguments follow."""

PAITIENT_HUB = """import sys
from paitient.config import load
from paitient.hub.run import hub_class
site = load(None, overrides={"workspace": {"state_dir": sys.argv[1]}})
hub_class(site).launch_instance(sys.argv[2:])
"""


def paitient_hub(state_dir: Path) -> list[str]:
    """The command of the hub class that ``paitient up`` runs (:func:`paitient.hub.run.hub_class`) for the
    embedded demo site with its state in ``state_dir`` (its audit trail); the config file's arguments follow."""
    return [sys.executable, "-c", PAITIENT_HUB, str(state_dir)]


def hub_settings(hub_dir: Path, **extra: Any) -> dict[str, Any]:
    """Free loopback ports, the proxy's command, the hub's folder and this Python, with ``extra``."""
    from paitient.hub.paths import default_proxy_command

    return {
        "port": free_port(),
        "hub_port": free_port(),
        "proxy_api_port": free_port(),
        "proxy": default_proxy_command(),
        "dir": str(hub_dir),
        "python": sys.executable,
        **extra,
    }


@contextlib.contextmanager
def running_hub(
    hub_dir: Path,
    config: str,
    settings: dict[str, Any],
    ready_path: str,
    ready_status: int,
    timeout: float = 60,
    command: list[str] | None = None,
) -> Iterator[str]:
    """The hub of ``config`` (the test's lines, after :data:`PRELUDE`) running; yields its public URL once
    ``GET ready_path`` answers ``ready_status``."""
    proc, log, log_path = _start(hub_dir, config, settings, command)
    url = f"http://127.0.0.1:{settings['port']}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if requests.get(url + ready_path, timeout=2).status_code == ready_status:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the hub did not come up: " + log_path.read_text()[-3000:]
            time.sleep(0.2)
        yield url
    finally:
        _stop(proc, log, hub_dir)


def failed_hub(
    hub_dir: Path, config: str, settings: dict[str, Any], timeout: float = 60, command: list[str] | None = None
) -> tuple[int, str]:
    """The exit status and the log of the hub of ``config``, started as :func:`running_hub` starts it, once it
    has exited; the test fails if it still runs after ``timeout`` (it is stopped then). A hub that exits at
    its start leaves its proxy running: that is stopped by its pid either way."""
    proc, log, log_path = _start(hub_dir, config, settings, command)
    try:
        try:
            status = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("the hub did not exit: " + log_path.read_text()[-3000:]) from None
        return status, log_path.read_text(errors="replace")
    finally:
        _stop(proc, log, hub_dir)


def _start(
    hub_dir: Path, config: str, settings: dict[str, Any], command: list[str] | None
) -> tuple[subprocess.Popen[bytes], IO[bytes], Path]:
    """The hub started (in a session of its own), its output going to ``hub_dir/hub.log``."""
    path = hub_dir / "jupyterhub_config.py"
    path.write_text(PRELUDE.format(settings=json.dumps(settings)) + config)
    log_path = hub_dir / "hub.log"
    log = open(log_path, "wb")  # noqa: SIM115 - the hub's output, read on failure
    proc = subprocess.Popen(
        [*(command or STOCK_HUB), "-f", str(path)],
        cwd=hub_dir,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, log, log_path


def _stop(proc: subprocess.Popen[bytes], log: IO[bytes], hub_dir: Path) -> None:
    """The hub stopped, if it still runs (it stops its managed services and the proxy it started), and the
    proxy by the pid in its pid file should it outlive the hub (as it does a hub that exits at its start),
    waiting until it is gone."""
    proxy_pid = _read_pid(hub_dir / "proxy.pid")
    proc.send_signal(signal.SIGTERM)  # nothing if the hub has exited
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    log.close()
    if proxy_pid and _alive(proxy_pid):  # make sure
        with contextlib.suppress(ProcessLookupError):
            os.kill(proxy_pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive(proxy_pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(proxy_pid):
                os.kill(proxy_pid, signal.SIGKILL)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def post_login(url: str, username: str, password: str) -> tuple[requests.Session, requests.Response]:
    """The login form posted as a browser does (its XSRF token first): the session and the hub's answer."""
    session = requests.Session()
    page = session.get(f"{url}/hub/login", timeout=10)
    found = re.search(r'name="_xsrf" value="([^"]+)"', page.text)
    assert found, page.text[:500]
    answer = session.post(
        f"{url}/hub/login",
        data={"_xsrf": found.group(1), "username": username, "password": password},
        allow_redirects=False,
        timeout=30,
    )
    return session, answer
