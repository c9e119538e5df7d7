"""The hub that ``paitient up`` runs (:func:`paitient.hub.run.hub_class`) starting a managed service with
pages, through a real JupyterHub and proxy: a service that opens its pages late is waited for and reached
through the proxy; one that exits before it listens, or never listens within its ``timeout``, stops the hub
with the reason in its log.

Each service is a few lines of Python that write their pid to a file, so that whatever the hub leaves
running is stopped by its pid at the end.
"""

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from paitient.services.kit.process import free_port
from tests.hubprocess import failed_hub, hub_settings, paitient_hub, running_hub

pytestmark = pytest.mark.e2e

HUB_CONFIG = """
c.JupyterHub.services = [
    {
        "name": s["service"],
        "url": "http://127.0.0.1:%d" % s["service_port"],
        "command": [s["python"], s["script"], s["pid_file"]],
        "timeout": s["service_timeout"],
    }
]
"""

SLOW = """import http.server, os, sys, time
from urllib.parse import urlparse
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(1.5)

class Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"the slow service answers"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

port = urlparse(os.environ["JUPYTERHUB_SERVICE_URL"]).port
http.server.HTTPServer(("127.0.0.1", port), Page).serve_forever()
"""

EXITS = """import sys
sys.exit(3)
"""

SILENT = """import os, sys, time
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(600)
"""


@pytest.fixture
def hub_for(tmp_path: Path) -> Iterator:
    """``hub_for(name, script, timeout=30)``: the hub's folder, settings and command for one managed service
    ``name`` running ``script``; the service is stopped by its pid at the end should it outlive the hub."""
    pid_files: list[Path] = []

    def make(name: str, script: str, timeout: int = 30) -> tuple[Path, dict, list[str]]:
        hub_dir = tmp_path / "hub"
        hub_dir.mkdir(mode=0o700)
        script_path = tmp_path / f"{name}.py"
        script_path.write_text(script)
        pid_file = tmp_path / f"{name}.pid"
        pid_files.append(pid_file)
        settings = hub_settings(
            hub_dir,
            service=name,
            service_port=free_port(),
            script=str(script_path),
            pid_file=str(pid_file),
            service_timeout=timeout,
        )
        return hub_dir, settings, paitient_hub(tmp_path / "state")

    yield make
    for pid_file in pid_files:
        stop_by_pid_file(pid_file)


def stop_by_pid_file(pid_file: Path) -> None:
    """The service whose pid ``pid_file`` holds stopped, if that process still runs its script (whose path
    is next to the pid file)."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    script = str(pid_file.with_suffix(".py")).encode()
    deadline = time.monotonic() + 10
    while running(pid, script):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM if time.monotonic() < deadline else signal.SIGKILL)
        time.sleep(0.1)


def running(pid: int, script: bytes) -> bool:
    """Whether process ``pid`` runs ``script`` (and is not a zombie, whose command line is empty)."""
    try:
        return script in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False


def test_a_service_that_opens_its_pages_late_is_reached_through_the_proxy(hub_for):
    hub_dir, settings, command = hub_for("slow", SLOW)
    with running_hub(hub_dir, HUB_CONFIG, settings, "/services/slow/", 200, command=command) as url:
        assert requests.get(f"{url}/hub/api", timeout=10).status_code == 200
        r = requests.get(f"{url}/services/slow/", timeout=10)
        assert r.status_code == 200 and r.text == "the slow service answers"


def test_a_service_that_exits_before_it_listens_stops_the_hub(hub_for):
    hub_dir, settings, command = hub_for("quitter", EXITS)
    status, log = failed_hub(hub_dir, HUB_CONFIG, settings, command=command)
    assert status == 1, log[-3000:]
    assert "Service quitter exited with status 3" in log


def test_a_service_that_never_listens_stops_the_hub_after_its_timeout(hub_for):
    hub_dir, settings, command = hub_for("silent", SILENT, timeout=2)
    status, log = failed_hub(hub_dir, HUB_CONFIG, settings, command=command)
    assert status == 1, log[-3000:]
    assert "Cannot connect to silent service" in log
