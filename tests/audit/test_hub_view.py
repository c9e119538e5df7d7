"""The web view through a real JupyterHub and proxy: the service entry from hub_service() runs, OAuth works,
and only a user holding custom:audit:read reads the trail.

Sign-in uses JupyterHub's DummyAuthenticator so this test needs no directory; sign-on itself is tested
in tests/hub.
"""

import pytest
import requests

from paitient.registry import Member, Registry
from paitient.services.audit import emit
from paitient.services.kit.stewards import OWN_RECORD
from tests import rootmember
from tests.hubprocess import hub_settings, post_login, running_hub

pytestmark = pytest.mark.e2e

HUB_CONFIG = """
from paitient.config import load
from paitient.services.audit.service import custom_scopes, hub_service, role_scopes

site = load(None, overrides={"workspace": {"state_dir": s["state_dir"]}})
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = s["password"]
c.Authenticator.allowed_users = {"sam", "alice"}
c.JupyterHub.services = [hub_service(site, s["python"])]
c.JupyterHub.custom_scopes = custom_scopes()
c.JupyterHub.load_roles = [
    {"name": "steward", "scopes": ["self", *role_scopes()], "users": ["sam"]},
    {"name": "user", "scopes": ["self", "access:services"]},
]
"""


@pytest.fixture
def hub(site, tmp_path):
    hub_dir = tmp_path / "hub"
    hub_dir.mkdir()
    settings = hub_settings(hub_dir, state_dir=str(site.state_dir), password="test-password")
    # ready once hub, proxy route and the audit service's web view are all up
    with running_hub(hub_dir, HUB_CONFIG, settings, "/services/audit/api/records", 403) as url:
        yield url
    assert not (site.run_dir / "audit.sock").exists()


def signed_in(url: str, user: str) -> requests.Session:
    session, r = post_login(url, user, "test-password")
    assert r.status_code == 302, r.text[:500]
    return session


def test_steward_reads_the_trail_and_a_researcher_is_refused(site, hub):
    # sam stewards both projects of the embedded site; alice is a member of oncology.
    member = Member(username="alice", account="pt-alice", uid=31002, projects=("oncology",), roles=("researcher",))
    rootmember.put(Registry.for_state_dir(site.state_dir), member)
    emit(site, actor="alice", action="cell.execute", object="k1", details={"code": "secret_analysis()"})

    steward = signed_in(hub, "sam")
    page = steward.get(f"{hub}/services/audit/?user=alice", timeout=30)  # OAuth dance via the hub
    assert page.status_code == 200 and page.url == f"{hub}/services/audit/?user=alice"
    assert "Signed in as sam" in page.text and "secret_analysis()" in page.text
    api = steward.get(f"{hub}/services/audit/api/records?action=cell.execute", timeout=30)
    assert [r["actor"] for r in api.json()["records"]] == ["alice"]

    alice = signed_in(hub, "alice")
    refused = alice.get(f"{hub}/services/audit/", timeout=30)
    assert refused.status_code == 403 and "secret_analysis" not in refused.text
    api = alice.get(f"{hub}/services/audit/api/records", timeout=30)
    assert api.status_code == 403 and "secret_analysis" not in api.text

    # Who read what is recorded; sam's own readings come back to sam without their content.
    views = [r for r in api_records(steward, hub, "audit.view") if r["actor"] == "sam"]
    assert len(views) == 2 and all(v["details"] == {"withheld": OWN_RECORD} for v in views)


def api_records(session, hub, action):
    return list(
        reversed(session.get(f"{hub}/services/audit/api/records?action={action}", timeout=30).json()["records"])
    )
