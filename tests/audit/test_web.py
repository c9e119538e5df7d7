"""The web view: scope required, filters applied, untrusted record text escaped, JSON errors from the API."""

import json

import pytest

from paitient.services.audit import emit
from paitient.services.audit.web import make_app
from tests.scrape import Served, header_auth

PREFIX = "/services/audit/"


@pytest.fixture
async def view(site):
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
