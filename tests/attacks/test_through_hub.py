"""The attacks again, through the real workspace: `paitient up` (directory, proxy, hub, services), sign-in
through the hub's login form, the user's server spawned as the user's account, kernels over the proxy.

The server-level suites in this folder cover each attack in depth; this one proves that what the hub
actually spawns is that same locked-down server, with the hub's real ports, files and tokens as targets.
Every test runs against both spawners: a local process (``paitient-local``) and a container on the podman
engine that `paitient up --spawner docker` starts (``paitient-docker``); the server's pid, log and
network namespace are found the same way for both (the container shares the host's pid namespace).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from paitient.config import load
from paitient.hub.paths import HubPaths
from paitient.ops.up import Running
from paitient.services.audit.writer import trail_files
from tests.attacks.conftest import PRELUDE
from tests.e2e.workspace import Workspace, own_workspace

pytestmark = pytest.mark.e2e


class HubAttacker:
    def __init__(self, ws: Workspace, user: str):
        self.ws, self.user = ws, user
        self.session = ws.login(user)
        ws.start_server(self.session, user)
        self.kernel_id = ws.start_kernel(self.session, user)
        res = ws.run_cell(self.session, user, PRELUDE, self.kernel_id)
        assert res.error is None, res

    def run(self, code: str):
        return self.ws.run_cell(self.session, self.user, code, self.kernel_id)

    def attempt(self, expr: str) -> dict:
        res = self.run(f"_report(lambda: {expr})")
        assert res.error is None, res
        return json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("@@")][-1][2:])

    def get(self, path: str, method: str = "GET", **kw):
        return self.session.request(
            method,
            self.ws.url + f"user/{self.user}/{path}",
            headers=self.ws.xsrf_headers(self.session, self.user),
            timeout=60,
            allow_redirects=False,
            **kw,
        )


@pytest.fixture(scope="module", params=["local", "docker"])
def hub(request):
    with own_workspace("pth-", "pth", up_args=(f"--spawner={request.param}",)) as ws:
        yield ws


@pytest.fixture(scope="module")
def running(hub) -> Running:
    return Running.read(HubPaths.of(load(hub.site_file)).up_file)


@pytest.fixture(scope="module")
def alice(hub) -> HubAttacker:
    return HubAttacker(hub, "alice")


@pytest.fixture(scope="module")
def bob(hub) -> HubAttacker:
    return HubAttacker(hub, "bob")


def _server_port(hub: Workspace, user: str) -> int:
    account = hub.member(user).account
    log = (HubPaths.of(load(hub.site_file)).log_dir / f"server-{account}.log").read_text()
    return int(re.search(r"http://127\.0\.0\.1:(\d+)/user/" + user, log).group(1))


@pytest.mark.parametrize("target", ["proxy", "proxy_api", "hub", "directory"])
def test_kernel_cannot_reach_the_workspace_services(hub, running, alice, target):
    port = {
        "proxy": hub.port,
        "proxy_api": running.proxy_api_port,
        "hub": running.hub_port,
        "directory": int(re.search(r":(\d+)/?$", running.directory_url).group(1)),
    }[target]
    out = alice.attempt(f"socket.create_connection(('127.0.0.1', {port}), timeout=5)")
    assert out["errno"] == "ECONNREFUSED", out


def test_kernel_cannot_reach_another_users_server(hub, alice, bob):
    out = alice.attempt(f"socket.create_connection(('127.0.0.1', {_server_port(hub, 'bob')}), timeout=5)")
    assert out["errno"] == "ECONNREFUSED", out


def test_kernel_has_no_route_out(alice):
    out = alice.attempt("(socket.if_nameindex(), open('/proc/net/route').read().splitlines()[1:])")
    assert out["ok"] and out["value"] == "([(1, 'lo')], [])", out


def test_kernel_sees_only_its_projects_data_read_only(alice):
    out = alice.attempt("os.listdir('/data')")
    assert out["ok"] and out["value"] == "['oncology']", out
    out = alice.attempt("os.listdir('/data/cardiometabolic')")
    assert out["errno"] == "ENOENT", out
    out = alice.attempt("open('/data/oncology/x.csv', 'w')")
    assert out["errno"] == "EROFS", out


def test_kernel_cannot_read_hub_state(hub, alice):
    paths = HubPaths.of(load(hub.site_file))
    for target in (
        paths.hub_dir / "jupyterhub.sqlite",
        paths.cookie_secret_file,
        hub.site_file,
        paths.up_file,
        load(hub.site_file).key_file,
    ):
        out = alice.attempt(f"open({str(target)!r}, 'rb').read()")
        assert out["errno"] == "ENOENT", (target, out)


def test_kernel_environment_has_no_hub_token(alice):
    out = alice.attempt("open('/proc/self/environ', 'rb').read()")
    assert out["ok"] and "JUPYTERHUB" not in out["value"] and "TOKEN" not in out["value"], out


def test_export_routes_are_closed_behind_the_proxy(hub, alice):
    assert alice.get("files/n.txt").status_code == 403
    assert alice.get("files/n.txt?download=1").status_code == 403
    assert alice.get("nbconvert/html/n.ipynb?download=true").status_code == 403
    assert alice.get("api/terminals").status_code == 404
    r = alice.get("api/kernels", method="POST", json={"name": "native"})
    assert r.status_code == 404, r.text[:300]


def test_huge_output_is_capped_behind_the_proxy(alice):
    # Site defaults: 1,000,000 bytes per message, 5,000,000 per execution. The kernel prints 6 MB slowly
    # enough (0.8 MB/s) to stay under the stock IOPub rate limit, which only delays output.
    res = alice.run("import time\nfor _i in range(12): print('q' * 500_000, flush=True); time.sleep(0.6)")
    assert len(res.stdout) < 5_000_000 and "exceeded 5,000,000 bytes" in res.stderr


def test_executed_code_is_in_the_audit_trail(hub, alice):
    marker = "audit-marker-" + os.urandom(4).hex()
    alice.run(f"_ = {marker!r}")
    trail = load(hub.site_file).state_dir / "audit"

    def found():
        for _, path in trail_files(trail):
            for line in path.read_bytes().splitlines():
                rec = json.loads(line)
                if rec["action"] == "cell.execute" and marker in rec["details"].get("code", ""):
                    return rec
        return None

    import time

    deadline = time.monotonic() + 15
    while found() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    rec = found()
    assert rec is not None and rec["actor"] == "alice" and rec["object"] == alice.kernel_id


# The user's server: its own network namespace, reaching the hub's API and nothing else. The probe runs in
# that namespace (entered through the server process's /proc entry) as the server's account, with the
# server's groups: what it can reach is what the server can reach.
SERVER_PROBE = """
import errno, json, socket, sys, urllib.request
targets, hub_port = json.loads(sys.argv[1]), int(sys.argv[2])
def attempt(host, port):
    try:
        socket.create_connection((host, port), timeout=5).close()
        return "open"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e))
v4 = [ln.split()[0] for ln in open("/proc/net/route").read().splitlines()[1:]]
v6 = [ln.split()[-1] for ln in open("/proc/net/ipv6_route").read().splitlines() if ln.strip()]
with urllib.request.urlopen(f"http://127.0.0.1:{hub_port}/hub/api/", timeout=10) as r:
    hub_api = [r.status, sorted(json.loads(r.read()))]
print(json.dumps({
    "interfaces": [n for _, n in socket.if_nameindex()], "routes": sorted(set(v4) | set(v6)),
    "hub_api": hub_api, "targets": {name: attempt(h, p) for name, (h, p) in targets.items()},
}))
"""


class Listener:
    """A host service of the test's own (v4 or v6 loopback) that counts what reaches it (also used by
    tests/docker, whose attacks on a container-spawned server count the same way)."""

    def __init__(self, host: str, family: int):
        self.sock = socket.create_server((host, 0), family=family)
        self.host, self.port, self.accepted = host, self.sock.getsockname()[1], 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                self.sock.accept()[0].close()
            except OSError:
                return
            self.accepted += 1


@pytest.fixture(scope="module")
def from_alices_server(hub, running, alice, bob):
    listeners = [Listener("127.0.0.1", socket.AF_INET), Listener("::1", socket.AF_INET6)]
    targets = {
        "proxy": ["127.0.0.1", hub.port],
        "proxy_api": ["127.0.0.1", running.proxy_api_port],
        "directory": ["127.0.0.1", int(re.search(r":(\d+)/?$", running.directory_url).group(1))],
        "bobs_server": ["127.0.0.1", _server_port(hub, "bob")],
        "host_v4": [listeners[0].host, listeners[0].port],
        "host_v6": [listeners[1].host, listeners[1].port],
    }
    pid = hub.server_pid("alice")
    pw = pwd.getpwnam(hub.member("alice").account)
    server_groups = Path(f"/proc/{pid}/status").read_text().split("Groups:")[1].split("\n")[0].split()
    argv = [
        "nsenter",
        f"--net=/proc/{pid}/ns/net",
        "--",
        "setpriv",
        f"--reuid={pw.pw_uid}",
        f"--regid={pw.pw_gid}",
        f"--groups={','.join(server_groups) or pw.pw_gid}",
        "--no-new-privs",
        sys.executable,
        "-I",
        "-c",
        SERVER_PROBE,
        json.dumps(targets),
        str(running.hub_port),
    ]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    yield {"pid": pid, "report": json.loads(r.stdout), "listeners": listeners}
    for listener in listeners:
        listener.sock.close()


def test_the_users_server_runs_in_a_network_namespace_of_its_own(from_alices_server):
    pid = from_alices_server["pid"]
    assert os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
    report = from_alices_server["report"]
    assert report["interfaces"] == ["lo"] and report["routes"] == ["lo"], report


def test_the_users_server_reaches_the_hubs_api(from_alices_server):
    status, keys = from_alices_server["report"]["hub_api"]
    assert status == 200 and "version" in keys


@pytest.mark.parametrize("target", ["proxy", "proxy_api", "directory", "bobs_server", "host_v4", "host_v6"])
def test_the_users_server_reaches_no_other_loopback_service(from_alices_server, target):
    assert from_alices_server["report"]["targets"][target] == "ECONNREFUSED", from_alices_server["report"]
    assert [listener.accepted for listener in from_alices_server["listeners"]] == [0, 0]
