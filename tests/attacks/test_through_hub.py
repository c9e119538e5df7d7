"""The attacks again, through the real workspace: `paitient up` (directory, proxy, hub, services), sign-in
through the hub's login form, the user's server spawned as the user's account, kernels over the proxy.

The server-level suites in this folder cover each attack in depth; this one proves that what the hub
actually spawns is that same locked-down server, with the hub's real ports, files and tokens as targets.
"""

from __future__ import annotations

import json
import os
import re

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


@pytest.fixture(scope="module")
def hub():
    with own_workspace("pth-", "pth") as ws:
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
