"""The web view: scope required, filters applied, untrusted record text escaped, JSON errors from the API."""

import json

import pytest

from paitient.config import parse
from paitient.registry import Member, Registry
from paitient.services.audit import emit
from paitient.services.audit.web import make_app
from tests import rootmember
from tests.scrape import Served, header_auth

PREFIX = "/services/audit/"


def register(site, username: str, uid: int, projects=(), roles=("researcher",)) -> None:
    member = Member(username=username, account=f"pt-{username}", uid=uid, projects=tuple(projects), roles=roles)
    rootmember.put(Registry.for_state_dir(site.state_dir), member)


@pytest.fixture
async def view(site):
    """The view as steward1; steward1 and steward2 are admins (who read every record)."""
    register(site, "steward1", 31000, roles=("steward", "admin"))
    register(site, "steward2", 31004, roles=("steward", "admin"))
    served = Served(make_app(site, PREFIX, hub_auth=header_auth(PREFIX, "audit")), PREFIX)
    yield served.as_user("steward1", "custom:audit:read")
    served.close()


@pytest.fixture
def events(site):
    emit(site, actor="alice", action="cell.execute", object="k1", details={"project": "demo", "code": "df.head()"})
    emit(site, actor="bob", action="airlock.request", object="req-1", details={"project": "heart"})
    emit(
        site,
        actor="<script>alert(1)</script>",
        action="auth.login",
        outcome="denied",
        details={"reason": "</pre><img src=x onerror=alert(2)>", "user": "alice"},
    )


async def test_signed_in_reader_sees_records_with_everything_escaped(view, events):
    r = await view("")
    assert r.code == 200
    body = r.body.decode()
    assert "<script>" not in body and "<img" not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert "&lt;/pre&gt;&lt;img src=x onerror=alert(2)&gt;" in body
    assert "script-src" not in r.headers["Content-Security-Policy"]
    assert r.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert "Signed in as steward1" in body and "df.head()" in body


async def test_reader_without_the_scope_is_refused(view, events):
    r = await view("", user="alice", scopes="access:services!service=audit")
    assert r.code == 403 and b"df.head()" not in r.body
    api = await view("api/records", user="alice", scopes="")
    assert api.code == 403 and json.loads(api.body)["status"] == 403


async def test_anonymous_page_goes_to_hub_login_and_api_refuses(view, events):
    r = await view("", user="")
    assert r.code == 302 and r.headers["Location"].startswith("/hub/api/oauth2/authorize")
    api = await view("api/records", user="")
    assert api.code == 403 and b"cell.execute" not in api.body


async def test_filters_apply(view, events):
    r = await view("api/records?project=demo")
    recs = json.loads(r.body)["records"]
    assert [x["actor"] for x in recs] == ["alice"]
    r = await view("api/records?user=alice")  # as actor, or as details.user (the failed sign-in about alice)
    assert {x["action"] for x in json.loads(r.body)["records"]} == {"cell.execute", "auth.login"}
    r = await view("api/records?action=airlock")
    assert [x["object"] for x in json.loads(r.body)["records"]] == ["req-1"]
    r = await view("api/records?since=2000-01-01&until=2000-12-31")
    assert json.loads(r.body)["records"] == []


async def test_paging_and_bad_input(view, events, site):
    r = await view("api/records?limit=1")
    newest = json.loads(r.body)["records"]
    assert len(newest) == 1 and newest[0]["action"] == "auth.login"
    r = await view(f"api/records?limit=1&before={newest[0]['seq']}")
    assert json.loads(r.body)["records"][0]["action"] == "airlock.request"
    bad = await view("api/records?since=yesterday")
    assert bad.code == 400 and "not understood" in json.loads(bad.body)["error"]
    bad = await view("api/records?limit=lots")
    assert bad.code == 400 and "whole numbers" in json.loads(bad.body)["error"]
    page = await view("?since=yesterday")
    assert page.code == 200 and b"not understood" in page.body


async def test_reading_is_itself_recorded(view, events, site):
    await view("api/records?project=demo&limit=5", user="steward1")
    r = await view("api/records?action=audit.view", user="steward2")
    seen = json.loads(r.body)["records"][0]
    assert seen["actor"] == "steward1" and seen["action"] == "audit.view"
    assert seen["details"] == {"filters": {"project": "demo"}, "records": 1}


async def test_verify_page_reports_a_broken_chain(view, events, site):
    r = await view("verify")
    assert r.code == 200 and b"Intact: 4 records" in r.body
    path = site.state_dir / "audit" / "trail-000001.jsonl"
    path.write_bytes(path.read_bytes().replace(b"df.head()", b"df.tail()"))
    r = await view("verify")
    assert b"BROKEN at trail-000001.jsonl line 2 (seq 1)" in r.body


async def test_a_steward_reads_their_projects_and_nothing_of_their_own_doing(view, site):
    """sam stewards oncology and also works in it. sam's kernel reports a cell with rows in its details and
    files an airlock request whose refusal quotes its file's name: none of that reaches sam's browser, which
    gets those records as their action and outcome only. sam reads oncology's and its members' records, not
    cardiometabolic's; an admin reads everything."""
    projects = [
        {"name": "oncology", "group": "oncology", "datasets": ["breast_cancer"], "stewards": ["sam"]},
        {"name": "cardiometabolic", "group": "cardiometabolic", "datasets": ["diabetes"], "stewards": ["tina"]},
    ]
    site = parse({"workspace": {"state_dir": str(site.state_dir)}, "projects": projects})
    served = Served(make_app(site, PREFIX, hub_auth=header_auth(PREFIX, "audit")), PREFIX)
    view = served.as_user("steward1", "custom:audit:read")
    register(site, "sam", 31001, ("oncology",), roles=("researcher", "steward"))
    register(site, "alice", 31002, ("oncology",))
    register(site, "bob", 31003, ("cardiometabolic",))
    row = "P-LGVLFVU6FADIJTQS,1984-07-19,F,HIV+"
    emit(site, actor="sam", action="cell.execute", object=f"k-{row}", details={"code": row * 50})
    emit(
        site,
        actor="sam",
        action="airlock.request",
        outcome="denied",
        details={"project": "oncology", "filename": f"{row}.csv", "reason": f"{row}: not a table"},
    )
    emit(site, actor="airlock", action="airlock.release", object="r1", details={"user": "sam", "note": row})
    emit(site, actor="alice", action="cell.execute", object="k1", details={"code": "alice_analysis()"})
    emit(site, actor="bob", action="cell.execute", object="k2", details={"code": "bob_analysis()"})
    emit(
        site,
        actor="bob",
        action="ledger.reserve",
        object="cardiometabolic/diabetes",
        details={"project": "cardiometabolic"},
    )
    # A filter reads what the reader's view of a record gives: nothing of a withheld record's content.
    for bit in (1, 0, 1):
        emit(site, actor="sam", action="cell.execute", object="k", details={"project": f"b{bit}"})
    assert json.loads((await view("api/records?project=b1", user="sam")).body)["records"] == []
    assert len(json.loads((await view("api/records?project=b1")).body)["records"]) == 2  # the admin's view
    for path in ("", "api/records", "api/records?user=sam", "api/records?action=cell.execute"):
        r = await view(path, user="sam")
        body = r.body.decode()
        assert r.code == 200 and "LGVLFVU6" not in body, path
        assert "bob_analysis" not in body and "cardiometabolic/diabetes" not in body, path
    records = json.loads((await view("api/records", user="sam")).body)["records"]
    mine = [r for r in records if "withheld" in r["details"]]
    assert {r["action"] for r in mine[:4]} == {"audit.view"}  # sam's readings above, also sam's own doing
    mine = [r for r in mine if r["action"] != "audit.view"]
    assert [(r["action"], r["outcome"]) for r in mine] == [
        ("cell.execute", "ok"),
        ("cell.execute", "ok"),
        ("cell.execute", "ok"),
        ("airlock.release", "ok"),
        ("airlock.request", "denied"),
        ("cell.execute", "ok"),
    ]
    assert all(r["details"] == {"withheld": mine[0]["details"]["withheld"]} and r["object"] == "" for r in mine)
    assert mine[0]["details"]["withheld"].startswith("a record of your own activity")
    assert "alice_analysis()" in json.dumps(records)  # a member of the project sam stewards
    # An admin reads all of it; another steward of oncology would, through the same rule as alice's.
    admin = (await view("api/records")).body.decode()
    assert "LGVLFVU6" in admin and "bob_analysis" in admin
    served.close()
