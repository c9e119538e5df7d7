"""The sign-on as a researcher meets it: a real JupyterHub (and proxy) with the paitient authenticator and a
real slapd. Messages on the login page, the hub surviving a directory outage, groups and roles in the hub.

Only sign-in is exercised here (no server is spawned); the full researcher path is in tests/e2e.
"""

import re
import secrets

import pytest
import requests

from paitient.services.audit.query import newest_first
from tests.hubprocess import hub_settings, running_hub
from tests.hubprocess import post_login as login

pytestmark = pytest.mark.e2e

HUB_CONFIG = """
import tomllib
from paitient.config import parse
from paitient.config import EMBEDDED_SITE
from paitient.hub.auth import configure_from_site

raw = tomllib.loads(EMBEDDED_SITE.read_text())
raw["workspace"]["state_dir"] = s["state_dir"]
site = parse(raw)
configure_from_site(c, site, s["directory_url"])
c.JupyterHub.services = [{"name": "probe", "api_token": s["token"]}]
c.JupyterHub.load_roles = [
    {"name": "probe", "scopes": ["read:users", "read:roles:users"], "services": ["probe"]}
]
"""


@pytest.fixture
def hub(slapd, tmp_path):
    hub_dir = tmp_path / "hub"
    hub_dir.mkdir()
    settings = hub_settings(
        hub_dir, state_dir=str(slapd.root.parent), directory_url=slapd.url, token=secrets.token_hex(16)
    )
    with running_hub(hub_dir, HUB_CONFIG, settings, "/hub/login", 200) as url:
        yield url, settings["token"], hub_dir


def post_login(url: str, username: str, password: str) -> requests.Response:
    return login(url, username, password)[1]


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
