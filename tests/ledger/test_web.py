"""The stewards' page: only stewarded projects, the numbers and runs, escaped, JSON errors from the API."""

import json

import pytest

from paitient.registry import Registry
from paitient.services.ledger.web import make_app, render_page, visible_projects
from tests.scrape import Served, header_auth

from .conftest import register

PREFIX = "/services/ledger/"


@pytest.fixture
async def page(site, ledger):
    served = Served(make_app(site, ledger, PREFIX, hub_auth=header_auth(PREFIX, "ledger")), PREFIX)
    yield served.as_user("sam", "custom:ledger:read")
    served.close()


@pytest.fixture
def runs(ledger):
    a = ledger.reserve("oncology", "breast_cancer", 3.0, 1e-6, user="alice", pid=1)
    ledger.settle(a, 2.5, record={"mode": "fast", "steps": 27, "weights_sha256": "ab" * 32})
    ledger.reserve("oncology", "gbsg2", 1.0, 1e-7, user="<b>mallory</b>", pid=1)
    ledger.reserve("cardio", "diabetes", 1.0, 1e-7, user="bob", pid=1)
    return a


async def test_steward_sees_budgets_and_runs(page, runs, site):
    r = await page()
    assert r.code == 200
    body = r.body.decode()
    assert "<h2>oncology</h2>" in body and "<h2>cardio</h2>" in body  # sam stewards both
    assert "<td>breast_cancer</td><td>10</td><td>2.5</td><td>0</td><td class='left'>7.5</td>" in body
    assert "<td>gbsg2</td><td>2</td><td>0</td><td>1</td><td class='left'>1</td>" in body
    assert "&lt;b&gt;mallory&lt;/b&gt;" in body and "<b>mallory" not in body
    assert "abababababababab" in body and runs in body
    assert r.headers["Content-Security-Policy"].startswith("default-src 'none'")


async def test_json_api(page, runs):
    r = await page("api/budget")
    data = json.loads(r.body)
    onc = {b["dataset"]: b for b in data["projects"]["oncology"]["budget"]}
    assert onc["breast_cancer"]["epsilon_left"] == 7.5 and data["user"] == "sam"
    assert all("pid" not in run for run in data["projects"]["oncology"]["runs"])


async def test_non_steward_sees_nothing_and_scope_is_required(page, runs, state_dir):
    register(state_dir, "alice", 30001, ("oncology",))
    r = await page(user="alice")
    assert r.code == 200 and "You steward no project." in r.body.decode() and "breast_cancer" not in r.body.decode()
    r = await page(scopes="")
    assert r.code == 403 and "user sam is not allowed" in r.body.decode()  # HubOAuthenticated checks the scope
    r = await page("api/budget", user=None)
    assert r.code == 403 and json.loads(r.body)["status"] == 403


async def test_a_steward_reads_no_record_their_own_kernel_wrote(page, runs, state_dir, ledger):
    """sam stewards oncology and also trains in it: what sam's kernel settles (a record's text fields, the run
    id, the weights' hash, an epsilon chosen to the last digit) would reach sam's browser unread by the gate.
    sam's page and API show that run's budget only, rounded; an admin reads all of it."""
    register(state_dir, "sam", 30003, ("oncology",), roles=("researcher", "steward"))
    row = "P-LGVLFVU6FADIJTQS,1984-07-19,F,HIV+"
    own = ledger.reserve("oncology", "breast_cancer", 0.1234567891, 1e-6, user="sam", run_id=f"run {row}", pid=1)
    ledger.settle(own, 0.0987654321, record={"mode": row, "note": row * 100, "weights_sha256": "cd" * 32})
    for path in ("", "api/budget"):
        r = await page(path)
        body = r.body.decode()
        assert r.code == 200 and "LGVLFVU6" not in body and "cdcdcdcd" not in body and "987654321" not in body
        assert "abababababababab" in body  # alice's run, which sam reviews, whole
    runs = json.loads((await page("api/budget")).body)["projects"]["oncology"]["runs"]
    mine = next(r for r in runs if r["id"] == own)
    assert mine["record"] == {} and mine["weights_sha256"] is None and "run_id" not in mine
    assert (mine["epsilon"], mine["epsilon_spent"]) == (0.1235, 0.09877)
    assert mine["withheld"].startswith("a record of your own activity")
    register(state_dir, "ada", 30004, (), roles=("admin",))
    admin = (await page("api/budget", user="ada")).body.decode()
    assert "LGVLFVU6" in admin and "cd" * 32 in admin


async def test_anonymous_is_sent_to_the_hub_login(page):
    r = await page(user=None)
    assert r.code == 302 and r.headers["Location"].startswith("/hub/api/oauth2/authorize")


def test_visible_projects(site, state_dir):
    reg = Registry.for_state_dir(state_dir)
    assert visible_projects(site, reg, "sam") == ["oncology", "cardio"]
    assert visible_projects(site, reg, "alice") == []
    register(state_dir, "root-admin", 30002, (), roles=("admin",))
    assert visible_projects(site, reg, "root-admin") == ["oncology", "cardio"]


def test_render_page_without_projects():
    assert "You steward no project." in render_page({}, "x")


async def test_a_kernels_run_reads_as_self_reported_whatever_its_record_says(page, ledger):
    """Attack: a kernel settles its run with the record a certified job's has (``mode: certified job``, a
    ``job ...`` note). The page showed the record's mode, so its row could not be told from a job's. Who
    trained a run now comes from its run id, which only the runner may give (``job:``, in any case refused
    to a kernel): a kernel's run reads "a kernel (self-reported)", the runner's "the runner (certified)"."""
    fake = ledger.reserve("oncology", "breast_cancer", 1.0, 1e-7, user="alice", pid=1, run_id="mine")
    ledger.settle(fake, 1.0, record={"mode": "certified job", "note": "job job-0123456789ab", "steps": 10})
    job = ledger.reserve("oncology", "gbsg2", 1.0, 1e-7, user="bob", run_id="job:job-ba9876543210")
    ledger.settle(job, 0.9, record={"mode": "certified job", "note": "job job-ba9876543210", "steps": 10})
    body = (await page()).body.decode()
    rows = {rid: row for row in body.split("<tr ") for rid in (fake, job) if rid in row}
    assert '<td class="trained-by">a kernel (self-reported)</td>' in rows[fake]
    assert '<td class="trained-by">the runner (certified)</td>' in rows[job]
    api = json.loads((await page("api/budget")).body)["projects"]["oncology"]["runs"]
    assert {r["id"]: r["trained_by"] for r in api} == {fake: "kernel", job: "runner"}
