"""The sign-on as a researcher meets it: a real JupyterHub (and proxy) with the paitient authenticator and a
real slapd. Messages on the login page, the hub surviving a directory outage, groups and roles in the hub.

Only sign-in is exercised here (no server is spawned); the full researcher path is in tests/e2e.
"""

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from paitient.hub.paths import default_proxy_command
from paitient.ops.directory import free_port
from paitient.services.audit.query import newest_first

pytestmark = pytest.mark.e2e

HUB_CONFIG = """
import json, tomllib
from paitient.config import parse
from paitient.config import EMBEDDED_SITE
from paitient.hub.auth import configure_from_site

settings = json.loads({settings!r})
raw = tomllib.loads(EMBEDDED_SITE.read_text())
raw["workspace"]["state_dir"] = settings["state_dir"]
site = parse(raw)
c = get_config()
configure_from_site(c, site, settings["directory_url"])
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = settings["port"]
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = settings["hub_port"]
c.ConfigurableHTTPProxy.command = [settings["proxy"]]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:%d" % settings["proxy_api_port"]
c.ConfigurableHTTPProxy.pid_file = settings["dir"] + "/proxy.pid"
c.JupyterHub.db_url = "sqlite:///" + settings["dir"] + "/hub.sqlite"
c.JupyterHub.cookie_secret_file = settings["dir"] + "/cookie_secret"
c.JupyterHub.services = [{{"name": "probe", "api_token": settings["token"]}}]
c.JupyterHub.load_roles = [
    {{"name": "probe", "scopes": ["read:users", "read:roles:users"], "services": ["probe"]}}
]
"""


@pytest.fixture
def hub(slapd, tmp_path):
    hub_dir = tmp_path / "hub"
    hub_dir.mkdir()
    port = free_port()
    settings = {
        "state_dir": str(slapd.root.parent),
        "directory_url": slapd.url,
        "port": port,
        "hub_port": free_port(),
        "proxy_api_port": free_port(),
        "proxy": default_proxy_command(),
        "dir": str(hub_dir),
        "token": secrets.token_hex(16),
    }
    config = hub_dir / "jupyterhub_config.py"
    config.write_text(HUB_CONFIG.format(settings=json.dumps(settings)))
    log = open(hub_dir / "hub.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterhub", "-f", str(config)],
        cwd=hub_dir,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (hub_dir / "hub.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/hub/login", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "hub did not come up: " + (hub_dir / "hub.log").read_text()[-3000:]
            time.sleep(0.2)
        yield url, settings["token"], hub_dir
    finally:
        proxy_pid = _read_pid(hub_dir / "proxy.pid")
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        if proxy_pid and _alive(proxy_pid):  # the hub stops the proxy it started; make sure
            os.kill(proxy_pid, signal.SIGTERM)


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


def post_login(url: str, username: str, password: str) -> requests.Response:
    session = requests.Session()
    page = session.get(f"{url}/hub/login", timeout=10)
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page.text).group(1)
    return session.post(
        f"{url}/hub/login",
        data={"_xsrf": xsrf, "username": username, "password": password},
        allow_redirects=False,
        timeout=30,
    )


def login_error(response: requests.Response) -> str:
    m = re.search(r'<p class="login_error">(.*?)</p>', response.text, re.S)
    return m.group(1).strip() if m else ""


def api_user(url: str, token: str, name: str) -> dict:
    r = requests.get(f"{url}/hub/api/users/{name}", headers={"Authorization": f"token {token}"}, timeout=10)
    r.raise_for_status()
    return r.json()


def test_login_page_messages_outage_and_hub_groups_and_roles(hub, slapd):
    url, token, hub_dir = hub
    creds = slapd.credentials()

    r = post_login(url, "dave", creds["dave"])
    assert r.status_code == 403
    assert login_error(r) == (
        "You are not a member of any paitient project. Ask your data integration centre to add you to a project group."
    )

    for name, password in (
        ("alice", "wrong"),
        ("alice", ""),
        ("zelda", "x"),
        (")(uid=*", creds["alice"]),
        ("*", creds["alice"]),
    ):
        r = post_login(url, name, password)
        assert r.status_code == 403, name
        assert login_error(r) == "Invalid username or password", name

    slapd.stop()
    r = post_login(url, "alice", creds["alice"])
    assert r.status_code == 503
    assert login_error(r) == "The hospital directory cannot be reached; try again in a few minutes."
    assert requests.get(f"{url}/hub/login", timeout=10).status_code == 200  # the hub keeps serving
    slapd.start()

    r = post_login(url, "carol", creds["carol"])
    assert r.status_code == 302, login_error(r)
    carol = api_user(url, token, "carol")
    assert sorted(carol["groups"]) == ["cardiometabolic", "oncology"]
    assert sorted(carol["roles"]) == ["researcher", "user"]

    r = post_login(url, "sam", creds["sam"])
    assert r.status_code == 302, login_error(r)
    sam = api_user(url, token, "sam")
    assert sam["groups"] == [] and sorted(sam["roles"]) == ["steward", "user"]

    outcomes = [
        (r["actor"], r["outcome"]) for r in newest_first(slapd.root.parent / "audit") if r["action"] == "auth.login"
    ]
    assert outcomes[:3] == [("sam", "ok"), ("carol", "ok"), ("alice", "error")]
    assert ("dave", "denied") in outcomes
