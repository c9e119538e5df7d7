"""The web view through a real JupyterHub and proxy: the service entry from hub_service() runs, OAuth works,
and only a user holding custom:audit:read reads the trail.

Sign-in uses JupyterHub's DummyAuthenticator so this test needs no directory; sign-on itself is tested
in tests/hub.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests

from paitient.services.audit import emit
from paitient.services.kit.process import free_port

pytestmark = pytest.mark.e2e

HUB_CONFIG = """
import json
from paitient.config import load
from paitient.services.audit.service import custom_scopes, hub_service, role_scopes

s = json.loads({settings!r})
site = load(None, overrides={{"workspace": {{"state_dir": s["state_dir"]}}}})
c = get_config()
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = s["password"]
c.Authenticator.allowed_users = {{"steward1", "alice"}}
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
c.JupyterHub.services = [hub_service(site, s["python"])]
c.JupyterHub.custom_scopes = custom_scopes()
c.JupyterHub.load_roles = [
    {{"name": "steward", "scopes": ["self", *role_scopes()], "users": ["steward1"]}},
    {{"name": "user", "scopes": ["self", "access:services"]}},
]
"""


@pytest.fixture
def hub(site, tmp_path):
    from paitient.hub.paths import default_proxy_command

    hub_dir = tmp_path / "hub"
    hub_dir.mkdir()
    port = free_port()
    settings = {
        "state_dir": str(site.state_dir),
        "port": port,
        "hub_port": free_port(),
        "proxy_api_port": free_port(),
        "proxy": default_proxy_command(),
        "dir": str(hub_dir),
        "python": sys.executable,
        "password": "test-password",
    }
    config = hub_dir / "jupyterhub_config.py"
    config.write_text(HUB_CONFIG.format(settings=json.dumps(settings)))
    log = open(hub_dir / "hub.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterhub", "-f", str(config)], cwd=hub_dir, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (hub_dir / "hub.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/services/audit/api/records", timeout=2).status_code == 403:
                    break  # hub, proxy route and the audit service's web view are all up
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, (hub_dir / "hub.log").read_text()[-3000:]
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)  # the hub stops its managed services and the proxy it started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        proxy_pid = _pid(hub_dir / "proxy.pid")
        if proxy_pid and _alive(proxy_pid):  # the hub stops the proxy it started; make sure
            os.kill(proxy_pid, signal.SIGTERM)
        assert not (site.run_dir / "audit.sock").exists()


def _pid(path):
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


def signed_in(url: str, user: str) -> requests.Session:
    s = requests.Session()
    page = s.get(f"{url}/hub/login", timeout=10)
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page.text).group(1)
    r = s.post(
        f"{url}/hub/login",
        data={"_xsrf": xsrf, "username": user, "password": "test-password"},
        allow_redirects=False,
        timeout=30,
    )
    assert r.status_code == 302, r.text[:500]
    return s


def test_steward_reads_the_trail_and_a_researcher_is_refused(site, hub):
    emit(site, actor="alice", action="cell.execute", object="k1", details={"code": "secret_analysis()"})

    steward = signed_in(hub, "steward1")
    page = steward.get(f"{hub}/services/audit/?user=alice", timeout=30)  # OAuth dance via the hub
    assert page.status_code == 200 and page.url == f"{hub}/services/audit/?user=alice"
    assert "Signed in as steward1" in page.text and "secret_analysis()" in page.text
    api = steward.get(f"{hub}/services/audit/api/records?action=cell.execute", timeout=30)
    assert [r["actor"] for r in api.json()["records"]] == ["alice"]

    alice = signed_in(hub, "alice")
    refused = alice.get(f"{hub}/services/audit/", timeout=30)
    assert refused.status_code == 403 and "secret_analysis" not in refused.text
    api = alice.get(f"{hub}/services/audit/api/records", timeout=30)
    assert api.status_code == 403 and "secret_analysis" not in api.text

    views = [r for r in api_records(steward, hub, "audit.view") if r["actor"] == "steward1"]
    assert [v["details"]["filters"] for v in views] == [{"user": "alice"}, {"action": "cell.execute"}]


def api_records(session, hub, action):
    return list(
        reversed(session.get(f"{hub}/services/audit/api/records?action={action}", timeout=30).json()["records"])
    )
