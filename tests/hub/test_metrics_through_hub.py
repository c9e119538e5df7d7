"""Through a real JupyterHub and proxy: the hub loads the culler's and the metrics token's services and roles,
the metrics token reads /hub/metrics and a service's /metrics, a researcher's and a steward's tokens do not,
and the culler runs with its role without being refused.

Sign-in uses JupyterHub's DummyAuthenticator, and the service is the audit service, so this needs neither a
directory nor accounts; tests/e2e/test_idle_and_metrics.py runs the whole workspace.
"""

import os
import time

import pytest
import requests

from paitient.config import load
from tests.hubprocess import hub_settings, running_hub

pytestmark = pytest.mark.e2e

HUB_CONFIG = """
from paitient.config import load
from paitient.hub.culler import culler_role, culler_service
from paitient.hub.hubconfig import METRICS_SERVICE, RESEARCHER_SCOPES, STEWARD_SCOPES
from paitient.services.audit.service import hub_service
from paitient.services.kit.metrics import METRICS_SCOPE
from pathlib import Path
import importlib
from paitient.services import SERVICES

site = load(None, overrides={"workspace": {"state_dir": s["state_dir"]}, "server": {"cull_timeout": 60}})
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = s["password"]
c.Authenticator.allowed_users = {"alice", "sam"}
c.JupyterHub.authenticate_prometheus = True
custom = {}
for module in SERVICES.values():
    custom.update(importlib.import_module(module).custom_scopes())
c.JupyterHub.custom_scopes = custom
c.JupyterHub.services = [
    hub_service(site, s["python"]),
    {"name": METRICS_SERVICE, "api_token": s["metrics_token"]},
    {"name": "tester", "api_token": s["tester_token"]},
    culler_service(site, s["python"], Path(s["dir"])),
]
c.JupyterHub.load_roles = [
    {"name": "user", "scopes": ["self"]},
    {"name": "researcher", "scopes": RESEARCHER_SCOPES, "users": ["alice"]},
    {"name": "steward", "scopes": STEWARD_SCOPES, "users": ["sam"]},
    {"name": METRICS_SERVICE, "scopes": [METRICS_SCOPE], "services": [METRICS_SERVICE]},
    {"name": "tester", "scopes": ["admin:users", "tokens"], "services": ["tester"]},
    culler_role(),
]
"""


@pytest.fixture
def hub(world_tmp):
    site = load(None, overrides={"workspace": {"state_dir": str(world_tmp / "state")}})
    hub_dir = world_tmp / "hub"
    hub_dir.mkdir(mode=0o700)
    settings = hub_settings(
        hub_dir,
        state_dir=str(site.state_dir),
        password="test-password",
        metrics_token=os.urandom(16).hex(),
        tester_token=os.urandom(16).hex(),
    )
    # ready once hub, proxy route and the audit service's pages are all up
    with running_hub(hub_dir, HUB_CONFIG, settings, "/services/audit/metrics", 403) as url:
        yield url, settings, hub_dir / "hub.log"


def token_for(url: str, tester: str, user: str) -> str:
    """A token of ``user`` with everything the user's roles allow (the hub's default for a new token)."""
    r = requests.post(
        f"{url}/hub/api/users/{user}/tokens",
        headers={"Authorization": f"token {tester}"},
        json={"note": "test"},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    return r.json()["token"]


def test_only_the_metrics_token_reads_metrics_and_the_culler_is_not_refused(hub):
    url, s, hub_log = hub
    for who in ("alice", "sam"):
        requests.post(f"{url}/hub/api/users/{who}", headers={"Authorization": f"token {s['tester_token']}"}, timeout=30)
    metrics = {"Authorization": f"Bearer {s['metrics_token']}"}
    r = requests.get(f"{url}/hub/metrics", headers=metrics, timeout=30)
    assert r.status_code == 200 and "jupyterhub_total_users" in r.text
    r = requests.get(f"{url}/services/audit/metrics", headers=metrics, timeout=30)
    assert r.status_code == 200 and "paitient_audit_records" in r.text

    for who in ("alice", "sam"):
        own = {"Authorization": f"token {token_for(url, s['tester_token'], who)}"}
        assert requests.get(f"{url}/hub/api/user", headers=own, timeout=30).status_code == 200  # a good token
        assert requests.get(f"{url}/hub/metrics", headers=own, timeout=30).status_code == 403, who
        r = requests.get(f"{url}/services/audit/metrics", headers=own, timeout=30)
        assert r.status_code == 403 and "paitient_" not in r.text, who
    assert requests.get(f"{url}/services/audit/metrics", timeout=30).status_code == 403

    # the culler runs with its role: it lists users and their servers (at once, then every 15 s), not refused
    def culler_lines() -> list[str]:
        return [line for line in hub_log.read_text(errors="replace").splitlines() if "(idle-culler@" in line]

    deadline = time.monotonic() + 40
    while not any("GET /hub/api/users" in line for line in culler_lines()):
        assert time.monotonic() < deadline, hub_log.read_text(errors="replace")[-3000:]
        time.sleep(1)
    listed = [line for line in culler_lines() if "GET /hub/api/users" in line]
    assert all(" 200 GET " in line for line in listed), listed
    assert not [line for line in culler_lines() if " 403 " in line or " 401 " in line], culler_lines()
    assert "Service idle-culler exited" not in hub_log.read_text(errors="replace")
