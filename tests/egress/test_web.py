"""The stewards' egress page: each steward sees the users of their projects, escaped, with a plot; others 403."""

from __future__ import annotations

import json
import os

import pytest

from paitient.config import parse
from paitient.registry import Member, Registry
from paitient.services.egress.store import EgressStore
from paitient.services.egress.web import PREFIX, make_app, plot, visible_users
from tests.scrape import Served, header_auth


@pytest.fixture
def site(world_tmp, database):
    """The stewards' site, the counts in ``database`` (parametrised: SQLite, then PostgreSQL)."""
    state = world_tmp / "state"
    state.mkdir()
    os.chmod(state, 0o755)
    return parse(
        {
            "workspace": {"state_dir": str(state)},
            "database": database,
            "projects": [
                {"name": "onc", "group": "cn=onc", "datasets": ["bc"], "stewards": ["sam"]},
                {"name": "card", "group": "cn=card", "datasets": ["dia"], "stewards": ["rita"]},
            ],
        }
    )


@pytest.fixture
def store(site):
    registry = Registry.for_state_dir(site.state_dir)
    registry.put(Member("alice", "pt-alice", 30001, ("onc",), ("researcher",)))
    registry.put(Member("<b>bob</b>", "pt-bob", 30002, ("card",), ("researcher",)))
    registry.put(Member("ada", "pt-ada", 30003, (), ("steward", "admin")))
    s = EgressStore.for_site(site)
    s.add("alice", "2026-12-01", size=120_000, rows={"onc/bc": [1, 2, 3]})
    s.add_withheld("alice", "2026-12-02")
    s.add("<b>bob</b>", "2026-12-02", size=5_000, rows={})
    yield s
    s.close()


@pytest.fixture
async def page(site, store):
    served = Served(make_app(site, store, PREFIX, hub_auth=header_auth(PREFIX, "egress")), PREFIX)
    yield served.as_user("sam", "custom:egress:read")
    served.close()


async def test_a_steward_sees_the_users_of_their_projects_only(page):
    r = await page("api/egress")
    days = json.loads(r.body)["days"]
    assert r.code == 200 and {d["user"] for d in days} == {"alice"}
    assert {(d["day"], d["bytes"], d["rows"], d["withheld"]) for d in days} == {
        ("2026-12-01", 120_000, 3, 0),
        ("2026-12-02", 0, 0, 1),
    }


async def test_an_admin_sees_everyone(page):
    r = await page("api/egress", user="ada")
    assert {d["user"] for d in json.loads(r.body)["days"]} == {"alice", "<b>bob</b>"}


async def test_the_page_is_escaped_and_has_the_plot(page):
    r = await page(user="ada")
    body = r.body.decode()
    assert r.code == 200 and "<b>bob</b>" not in body and "&lt;b&gt;bob&lt;/b&gt;" in body
    assert body.count('<rect class="bar') == 2 and '<rect class="bar held"' in body
    assert "<script" not in body and "script-src" not in r.headers.get("Content-Security-Policy", "script-src")


async def test_without_the_scope_it_is_refused(page):
    r = await page("api/egress", scopes="custom:ledger:read")
    assert r.code == 403 and "custom:egress:read" in json.loads(r.body)["error"]
    r = await page("api/egress", user="")
    assert r.code == 403


def test_visible_users_follow_the_projects_stewarded(site, store):
    registry = Registry.for_state_dir(site.state_dir)
    assert visible_users(site, registry, "sam") == {"alice"}
    assert visible_users(site, registry, "rita") == {"<b>bob</b>"}
    assert visible_users(site, registry, "ada") is None
    assert visible_users(site, registry, "nobody") == set()


def test_the_plot_scales_to_the_busiest_day(store):
    geometry = plot(store.history())
    tallest = max(geometry["bars"], key=lambda b: b["h"])
    assert tallest["day"] == "2026-12-01" and geometry["peak"] == 120_000
