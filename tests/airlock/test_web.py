"""The review pages through tornado, with the hub's real OAuth client and XSRF rules.

Only the identity step is replaced: :class:`KnownUserOAuth` subclasses JupyterHub's ``HubOAuth`` and returns
a fixed user model (name and scopes, as the hub would give them for a token) chosen by a test cookie, so
the handlers' real ``HubOAuthenticated`` logic (scope check, login redirect, XSRF) runs unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import re
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlparse

import pandas as pd
import pytest
from PIL import Image
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from paitient.channel import Peer
from paitient.rules import review
from paitient.services.airlock.images import shown_pixels
from paitient.services.airlock.web import make_app
from paitient.services.audit import trail_dir
from paitient.services.audit.query import newest_first
from tests.airlock.helpers import (
    GOOD,
    PREFIX,
    STEWARD,
    Client,
    csv_bytes,
    hub_api_double,
    registry_counts,
    submit,
    wait_state,
)


async def test_unauthenticated_visitors_go_to_the_hub_login(web):
    r = await web.fetch(None, "")
    assert r.code == 302
    assert r.headers["Location"].startswith("/hub/api/oauth2/authorize?")
    assert "client_id=service-airlock" in r.headers["Location"]


async def test_hub_oauth_round_trip_with_pkce(airlock, people):
    """Login redirect, the hub's answer at oauth_callback, the token cookie: the callback finds the state and
    PKCE verifier the login redirect stored (both handlers share one HubOAuth)."""
    auth = hub_api_double({"c0de": {"name": "sam", "scopes": STEWARD}})
    app = make_app(airlock, prefix=PREFIX, hub_auth=auth)
    sock, port = bind_unused_port()
    server = HTTPServer(app)
    server.add_sockets([sock])
    web = Client(f"http://127.0.0.1:{port}")
    try:
        first = await web.fetch(None, "requests/20260101-deadbeef")
        assert first.code == 302
        query = parse_qs(urlparse(first.headers["Location"]).query)
        cookies = {k: v.value for k, v in SimpleCookie(", ".join(first.headers.get_list("Set-Cookie"))).items()}
        back = await web.fetch(None, f"oauth_callback?code=c0de&state={query['state'][0]}", cookies=cookies)
        assert back.code == 302, back.body
        assert back.headers["Location"] == f"{PREFIX}requests/20260101-deadbeef"
        verifier = auth.verifiers_seen[-1]
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        assert challenge == query["code_challenge"][0]
        session = {
            k: v.value for k, v in SimpleCookie(", ".join(back.headers.get_list("Set-Cookie"))).items() if v.value
        }
        page = await web.fetch(None, "", cookies=session)
        assert page.code == 200 and "signed in as <strong>sam</strong>" in page.body.decode()
        # A replayed callback with a state nobody started is refused.
        again = await web.fetch(None, "oauth_callback?code=c0de&state=forged")
        assert again.code in (400, 403)
    finally:
        server.stop()
        await server.close_all_connections()


async def test_a_token_without_access_to_the_service_is_refused(web):
    r = await web.fetch("eve", "")
    assert r.code == 403 and b"user eve is not allowed" in r.body


async def test_steward_sees_checks_preview_and_justification_escaped(web, airlock, people):
    hostile = pd.DataFrame({"group": ["<script>alert(1)</script>", "b"], "n": [3, 40]})
    rid = submit(airlock, people, "alice", csv_bytes(hostile), justification="<img src=x onerror=alert(2)>")
    wait_state(airlock, rid, review.IN_REVIEW)
    listing = (await web.fetch("sam", "")).body.decode()
    assert f'data-id="{rid}"' in listing and "awaits your review" in listing
    r = await web.fetch("sam", f"requests/{rid}")
    page = r.body.decode()
    assert r.code == 200 and "script-src" not in r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert(1)" not in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page and "<img src=x" not in page
    assert 'data-check="minimum_count"' in page and "1 cell(s) count fewer than 10" in page
    assert '<td class="flagged" title="fails a disclosure check">3</td>' in page  # the small cell, marked
    assert 'id="decision-form"' in page
    # Which cells fail: the steward sees them; the researcher's page gives each check's outcome and what it
    # looks at (why: in the notebook), and only the steward gets a decision form.
    assert "&quot;threshold&quot;: 10" in page and "&quot;value&quot;: 3.0" in page
    own = (await web.fetch("alice", f"requests/{rid}")).body.decode()
    assert "every count is at least the project&#x27;s minimum: failed; airlock.status(id) in your notebook" in own
    assert "1 cell(s) count fewer than 10" not in own and "&quot;value&quot;" not in own
    assert 'id="decision-form"' not in own


async def test_decisions_need_the_xsrf_token_and_a_comment(web, airlock, people):
    rid = submit(airlock, people, "alice", GOOD)
    wait_state(airlock, rid, review.IN_REVIEW)
    r = await web.fetch("sam", f"requests/{rid}/decision", method="POST", body={"action": "approve", "comment": "ok"})
    assert r.code == 403 and b"&#x27;_xsrf&#x27; argument missing from POST" in r.body
    r = await web.decide("sam", rid, "approve", "   ")
    assert r.code == 400 and b"a decision needs a comment" in r.body
    assert airlock.store.get(rid).state == "in_review"
    r = await web.decide("sam", rid, "approve", "aggregate, counts above 10")
    assert r.code == 303 and r.headers["Location"] == f"{PREFIX}requests/{rid}"
    assert airlock.store.get(rid).state == "released"


async def test_nobody_reviews_their_own_request(web, airlock, people):
    rid = submit(airlock, people, "steph", GOOD, project="oncology")
    wait_state(airlock, rid, review.IN_REVIEW)
    page = (await web.fetch("steph", f"requests/{rid}")).body.decode()
    assert 'id="own-request"' in page and 'id="decision-form"' not in page
    # Even with a valid token from another page, the decision is refused and recorded as denied.
    other = submit(airlock, people, "alice", GOOD)
    wait_state(airlock, other, review.IN_REVIEW)
    form = await web.fetch("steph", f"requests/{other}")
    token = re.search(r'name="_xsrf" value="([^"]+)"', form.body.decode()).group(1)
    cookie = SimpleCookie(form.headers["Set-Cookie"])["_xsrf"].value
    r = await web.fetch(
        "steph",
        f"requests/{rid}/decision",
        method="POST",
        body={"action": "approve", "comment": "mine is fine", "_xsrf": token},
        cookies={"_xsrf": cookie},
    )
    assert r.code == 403 and b"nobody reviews their own request" in r.body
    assert airlock.store.get(rid).state == "in_review"
    denied = [x for x in newest_first(trail_dir(airlock.site)) if x["action"] == "airlock.decision"]
    assert denied[0]["outcome"] == "denied" and denied[0]["actor"] == "steph"
    assert (await web.decide("sam", rid, "approve", "checked")).code == 303
    assert airlock.store.get(rid).state == "released"


async def test_two_independent_approvals_where_the_project_needs_them(web, airlock, people):
    rid = submit(airlock, people, "bob", GOOD)
    wait_state(airlock, rid, review.IN_REVIEW)
    assert (await web.decide("sam", rid, "approve", "first look fine")).code == 303
    assert airlock.store.get(rid).state == "in_review"
    r = await web.decide("sam", rid, "approve", "again")
    assert r.code == 409 and b"already approved this request" in r.body
    assert (await web.decide("steph", rid, "approve", "second look fine")).code == 303
    assert airlock.store.get(rid).state == "released"
    page = (await web.fetch("bob", f"requests/{rid}")).body.decode()
    assert "first look fine" in page and "second look fine" in page


async def test_return_and_reject_end_the_review_with_the_reason(web, airlock, people):
    returned = submit(airlock, people, "alice", GOOD)
    rejected = submit(airlock, people, "alice", GOOD, name="u.csv")
    airlock.wait_idle()
    assert (await web.decide("sam", returned, "return", "round to 5")).code == 303
    assert (await web.decide("sam", rejected, "reject", "row-level data")).code == 303
    assert airlock.store.get(returned).state == "returned" and airlock.store.get(rejected).state == "rejected"
    mine = airlock.op_status(Peer(1, 30001, 65534), {"id": returned}, [])
    assert mine["decisions"][0]["comment"] == "round to 5" and mine["state"] == "returned"
    page = (await web.fetch("sam", f"requests/{returned}")).body.decode()
    assert 'id="decision-form"' not in page


async def test_only_stewards_of_the_project_review_it(web, airlock, people):
    rid = submit(airlock, people, "alice", GOOD)
    wait_state(airlock, rid, review.IN_REVIEW)
    r = await web.fetch("rita", f"requests/{rid}")
    assert r.code == 403 and b"not of a project you review" in r.body
    assert f'data-id="{rid}"'.encode() not in (await web.fetch("rita", "")).body
    # bob is a researcher of another project: not even the page.
    assert (await web.fetch("bob", f"requests/{rid}")).code == 403


async def test_download_only_by_requester_and_members_each_recorded(web, airlock, people):
    rid = submit(airlock, people, "alice", GOOD)
    wait_state(airlock, rid, review.IN_REVIEW)
    early = await web.fetch("alice", f"requests/{rid}/download")
    assert early.code == 403 and b"is in_review, not released" in early.body
    assert (await web.decide("sam", rid, "approve", "fine")).code == 303
    for user in ("alice", "carol"):
        r = await web.fetch(user, f"requests/{rid}/download")
        assert r.code == 200 and r.body == GOOD
        assert r.headers["X-Airlock-SHA256"] == hashlib.sha256(GOOD).hexdigest()
        assert r.headers["Content-Disposition"] == "attachment; filename*=UTF-8''t.csv"
    for user, reason in (
        ("bob", b"only the requester and members of project oncology"),
        ("sam", b"only the requester and members of project oncology"),
        ("dave", b"only the requester and members of project oncology"),
    ):
        r = await web.fetch(user, f"requests/{rid}/download")
        assert r.code == 403 and reason in r.body, (user, r.body)
    downloads = airlock.store.events(rid, "download")
    assert [d.actor for d in downloads] == ["alice", "carol"]
    trail = [x for x in newest_first(trail_dir(airlock.site)) if x["action"] == "airlock.download"]
    assert sorted((x["actor"], x["outcome"]) for x in trail) == [
        ("alice", "denied"),
        ("alice", "ok"),
        ("bob", "denied"),
        ("carol", "ok"),
        ("dave", "denied"),
        ("sam", "denied"),
    ]


async def test_automatic_release_only_when_allowed_and_every_check_passed(site, web, airlock, people):
    df = registry_counts(site)
    recipe = {"dataset": "counts", "index": ["age_band"], "aggfunc": "count"}
    clean = submit(
        airlock, people, "ren", csv_bytes(df.groupby("age_band").size().rename("n").reset_index()), recipe=recipe
    )
    small = submit(airlock, people, "ren", csv_bytes(pd.DataFrame({"x": ["a"], "n": [4]})), name="s.csv")
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 90, 200)).save(png, "PNG")
    figure = submit(airlock, people, "ren", png.getvalue(), kind="figure", name="f.png")
    airlock.wait_idle()
    assert airlock.store.get(clean).state == "released"
    assert airlock.store.events(clean, "state")[-1].data["automatic"] is True
    assert airlock.store.get(small).state == "in_review"
    assert airlock.store.get(figure).state == "in_review"  # figures always get a human
    assert airlock.store.checks(figure)[1]["reason"].startswith("there is no automatic disclosure check for figures")
    # oncology does not release automatically, even a clean table.
    onc = submit(airlock, people, "alice", GOOD)
    airlock.wait_idle()
    assert airlock.store.get(onc).state == "in_review"


async def test_an_override_of_failed_checks_needs_a_reason_both_stewards_see_and_it_stands_out(web, airlock, people):
    # cardio needs two approvals; a count of 4 fails the minimum count
    rid = submit(airlock, people, "bob", csv_bytes(pd.DataFrame({"x": ["a", "b"], "n": [4, 30]})), name="s.csv")
    wait_state(airlock, rid, review.IN_REVIEW)
    page = (await web.fetch("sam", f"requests/{rid}")).body.decode()
    assert 'id="failed-checks"' in page and 'name="override"' in page and "minimum_count" in page
    refused = await web.decide("sam", rid, "approve", "fine")
    assert refused.code == 400 and b"approving needs an override reason" in refused.body
    denied = next(x for x in newest_first(trail_dir(airlock.site)) if x["action"] == "airlock.decision")
    assert denied["outcome"] == "denied" and "override reason" in denied["details"]["reason"]
    reason = "the 4 are the same clinic's staff counts, not patients"
    assert (await web.decide_with("sam", rid, action="approve", comment="see reason", override=reason)).code == 303
    second = html.unescape((await web.fetch("steph", f"requests/{rid}")).body.decode())
    assert 'id="earlier-override"' in second and reason in second and 'name="confirm_override"' in second
    unconfirmed = await web.decide("steph", rid, "approve", "agree")
    assert unconfirmed.code == 400 and b"confirm that override" in unconfirmed.body
    assert airlock.store.get(rid).state == review.IN_REVIEW
    confirmed = await web.decide_with("steph", rid, action="approve", comment="agree", confirm_override="yes")
    assert confirmed.code == 303 and airlock.store.get(rid).state == review.RELEASED
    listing = (await web.fetch("sam", "")).body.decode()
    row = re.search(rf'<tr[^>]*data-id="{rid}".*?</tr>', listing, re.S).group(0)
    assert 'class="override"' in row
    trail = [
        x for x in newest_first(trail_dir(airlock.site)) if x["action"] == "airlock.decision" and x["outcome"] == "ok"
    ]
    assert trail[0]["details"]["confirms_override"] == reason and trail[1]["details"]["override"] == reason


async def test_auto_release_never_takes_weights_without_a_signed_record(site, web, airlock, people):
    from paitient.config import ConfigError, parse
    from tests.airlock.conftest import SITE

    with pytest.raises(ConfigError, match="'other' outputs are always reviewed"):
        parse({**SITE, "projects": [{**SITE["projects"][2], "auto_release": ["other"]}]})
    # registry releases tables automatically; let it list weights too, and take kernel-trained ones
    projects = [dict(p) for p in SITE["projects"]]
    projects[2].update(auto_release=["table", "weights"], stewards=["sam", "rita"], self_reported_weights="two-person",
                       self_reported_reason="methods comparison")  # fmt: skip
    airlock.site = parse({**SITE, "projects": projects}, overrides={"workspace": {"state_dir": str(site.state_dir)}})
    import torch
    from safetensors.torch import save

    rid = submit(airlock, people, "ren", save(torch.nn.Linear(3, 2).state_dict()), kind="weights", name="m.safetensors")
    wait_state(airlock, rid, review.IN_REVIEW)
    assert airlock.store.get(rid).state == review.IN_REVIEW  # no signed record: a steward decides
    assert not any(e.data.get("automatic") for e in airlock.store.events(rid, "state"))


async def test_image_preview_for_the_steward(web, airlock, people):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (0, 90, 200)).save(buf, "PNG")
    png = buf.getvalue()
    rid = submit(airlock, people, "alice", png, kind="figure", name="km.png")
    wait_state(airlock, rid, review.IN_REVIEW)
    page = (await web.fetch("sam", f"requests/{rid}")).body.decode()
    assert f'src="{PREFIX}requests/{rid}/preview"' in page
    r = await web.fetch("sam", f"requests/{rid}/preview")
    assert r.code == 200 and r.headers["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(r.body)).tobytes() == shown_pixels(Image.open(io.BytesIO(png))).tobytes()
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert (await web.fetch("carol", f"requests/{rid}/preview")).code == 403


async def test_api_answers_json_errors(web, airlock, people):
    r = await web.fetch("alice", "api/requests/20260101-deadbeef")
    assert r.code == 404 and r.headers["Content-Type"] == "application/json"
    assert r.body == b'{"error": "there is no airlock request 20260101-deadbeef", "status": 404}'
    rid = submit(airlock, people, "alice", GOOD)
    airlock.wait_idle()
    import json

    listing = json.loads((await web.fetch("alice", "api/requests")).body)
    assert [x["id"] for x in listing["requests"]] == [rid]


def certified_weights(airlock, user: str, uid: int, graph: str) -> str:
    """A weights request of oncology whose certified check passed for graph ``graph``. (The runner's signed
    record is stood in for by the check result the worker writes for it: approvals are counted the same
    whatever signed it; tests/jobs/test_runner.py runs real jobs.)"""
    req = airlock.store.create(
        project="oncology", username=user, account=f"pt-{user}", uid=uid, kind="weights", filename="j.safetensors",
        sha256=f"{uid % 256:02x}" * 32, size=1, justification="a model", meta={"job": "job-abcdef"},
    )  # fmt: skip
    checked = {"check": "certified", "status": "pass", "details": {"record": {"graph_sha256": graph}}}
    airlock.store.record_checks(req.id, [checked])
    return req.id


def test_a_stewards_approval_of_a_graph_does_not_count_for_their_own_weights(site, airlock, people):
    """steph is a researcher and a steward of oncology (one approval needed). She approves graph G on
    alice's request; her own weights of G still wait for another steward's approval, which then counts for
    both. (The runner's signed record is stood in for by the check result the worker writes for it: the
    approvals are counted the same whatever signed it; tests/jobs/test_runner.py runs real jobs.)"""
    graph = "ab" * 32
    alices, stephs = (
        certified_weights(airlock, "alice", 30001, graph),
        certified_weights(airlock, "steph", 30005, graph),
    )
    scopes = {"custom:airlock:review"}
    with pytest.raises(review.TransitionError, match="you filed this request: another steward approves its graph"):
        airlock.decide_graph(stephs, username="steph", scopes=scopes, action="approve", reason="my own graph, read")
    airlock.graph_read(airlock.store.get(alices), "steph")
    airlock.decide_graph(alices, username="steph", scopes=scopes, action="approve", reason="read whole: one layer")
    assert airlock.graph_standing(airlock.store.get(alices)).approved
    own = airlock.graph_standing(airlock.store.get(stephs))
    assert not own.approved and own.approvals == ()
    airlock.graph_read(airlock.store.get(stephs), "sam")
    airlock.decide_graph(stephs, username="sam", scopes=scopes, action="approve", reason="read whole: one layer too")
    assert [a.actor for a in airlock.graph_standing(airlock.store.get(stephs)).approvals] == ["sam"]
    assert [a.actor for a in airlock.graph_standing(airlock.store.get(alices)).approvals] == ["steph", "sam"]


def test_a_graph_approval_is_revoked_on_the_approvers_own_request_and_ends_with_their_stewardship(
    site, airlock, people
):
    """steph's approval of graph G, given on alice's request, is in force on steph's own request too (shown,
    not counted): sam revokes it there. And an approval counts only while its steward is one of the
    project's: steph taken off oncology's stewards takes hers along."""
    from paitient.config import parse
    from tests.airlock.conftest import SITE

    graph = "ef" * 32
    scopes = {"custom:airlock:review"}
    alices, stephs = (
        certified_weights(airlock, "alice", 30001, graph),
        certified_weights(airlock, "steph", 30005, graph),
    )
    airlock.graph_read(airlock.store.get(alices), "steph")
    airlock.decide_graph(alices, username="steph", scopes=scopes, action="approve", reason="read whole: one layer")
    own = airlock.graph_standing(airlock.store.get(stephs))
    assert not own.approved and own.approvals == () and [a.actor for a in own.in_force] == ["steph"]
    airlock.decide_graph(stephs, username="sam", scopes=scopes, action="revoke", reason="")
    assert not airlock.graph_standing(airlock.store.get(alices)).approved  # revoked on steph's page, for all
    # approved again, then steph is no longer a steward of oncology: her approval no longer counts
    airlock.decide_graph(alices, username="steph", scopes=scopes, action="approve", reason="read whole: one layer")
    assert airlock.graph_standing(airlock.store.get(alices)).approved
    projects = [dict(p) for p in SITE["projects"]]
    projects[0]["stewards"] = ["sam", "rita"]
    airlock.site = parse({**SITE, "projects": projects}, overrides={"workspace": {"state_dir": str(site.state_dir)}})
    gone = airlock.graph_standing(airlock.store.get(alices))
    assert not gone.approved and gone.approvals == () and gone.in_force == ()
    with pytest.raises(review.TransitionError, match="no steward has approved this graph"):
        airlock.decide_graph(alices, username="sam", scopes=scopes, action="revoke", reason="")
