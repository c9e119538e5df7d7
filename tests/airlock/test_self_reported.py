"""Weights trained in a kernel are self-reported: a project refuses them by default, and one that allows them
needs two independent approvals and a written reason. Certified weights (from a training job) keep the
project's own number of approvals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

from paitient.channel import ChannelError
from paitient.config import ConfigError, parse
from paitient.rules import review
from paitient.services.audit import trail_dir
from paitient.services.audit.query import newest_first
from tests.airlock.conftest import SITE
from tests.airlock.helpers import submit, wait_state


def _weights(seed: int = 0) -> bytes:
    torch.manual_seed(seed)
    return save(torch.nn.Linear(30, 2).state_dict())


def test_the_rule_refuses_self_reported_weights_unless_the_project_takes_two_approvals():
    common = {"project": "oncology", "kind": "weights", "project_approvals": 1}
    assert review.approvals_for(**common, certified=True, self_reported_policy="refuse") == 1
    assert review.approvals_for(**common, certified=False, self_reported_policy="two-person") == 2
    with pytest.raises(review.TransitionError) as refused:
        review.approvals_for(**common, certified=False, self_reported_policy="refuse")
    assert refused.value.status == 403
    assert "project oncology does not release self-reported weights" in str(refused.value)
    assert "paitient.jobs.submit" in str(refused.value)
    # Other kinds keep the project's number, whatever the weights policy.
    table = {**common, "kind": "table", "project_approvals": 2}
    assert review.approvals_for(**table, certified=False, self_reported_policy="refuse") == 2


def _project(**settings) -> dict:
    return {"name": "p", "group": "p", "datasets": ["d"], "stewards": ["sam", "steph"], **settings}


def test_the_default_refuses_and_two_person_needs_a_reason_and_two_stewards():
    assert parse({"projects": [_project()]}).project("p").self_reported_weights == "refuse"
    with pytest.raises(ConfigError, match="self_reported_reason: is required"):
        parse({"projects": [_project(self_reported_weights="two-person")]})
    with pytest.raises(ConfigError, match="name at least two in stewards"):
        parse(
            {"projects": [_project(stewards=["sam"], self_reported_weights="two-person", self_reported_reason="why")]}
        )
    with pytest.raises(ConfigError, match="one of 'refuse', 'two-person'"):
        parse({"projects": [_project(self_reported_weights="allow")]})


def test_a_project_that_refuses_takes_no_weights_trained_in_the_kernel(site, airlock, people):
    # bob is in cardio, which keeps the default policy.
    with pytest.raises(ChannelError) as refused:
        submit(airlock, people, "bob", _weights(), kind="weights", name="m.safetensors")
    assert refused.value.code == "forbidden"
    assert "project cardio does not release self-reported weights" in str(refused.value)
    assert "airlock.request(job, justification=...)" in str(refused.value)
    assert airlock.store.list(username="bob") == []  # nothing kept
    denied = next(r for r in newest_first(trail_dir(site)) if r["action"] == "airlock.request")
    assert denied["actor"] == "bob" and denied["outcome"] == "denied"
    assert "does not release self-reported weights" in denied["details"]["reason"]


async def test_two_independent_approvals_for_self_reported_weights(web, airlock, people):
    rid = submit(airlock, people, "alice", _weights(1), kind="weights", name="m.safetensors")
    wait_state(airlock, rid, review.IN_REVIEW)
    checks = {c["check"]: c for c in airlock.store.checks(rid)}
    assert checks["certified"]["status"] == "review" and checks["policy"]["status"] == "review"
    assert "compared with certified ones for the methods paper" in checks["policy"]["reason"]
    page = (await web.fetch("sam", f"requests/{rid}")).body.decode()
    assert 'id="self-reported"' in page and 'id="approvals-needed">2<' in page
    assert "compared with certified ones for the methods paper" in page
    # No model definition came with these weights, so the audit could not run: approving is an override.
    failed = [c for c, r in checks.items() if r["status"] == "fail"]
    assert "membership_inference" in failed
    reason = "audited by hand on the held-out split in the workspace"
    # oncology's own number is 1; these weights need 2.
    assert (await web.decide_with("sam", rid, action="approve", comment="fine", override=reason)).code == 303
    assert airlock.store.get(rid).state == review.IN_REVIEW
    again = await web.decide_with("sam", rid, action="approve", comment="still fine", override=reason)
    assert again.code == 409 and b"already approved this request" in again.body
    second = await web.decide_with("steph", rid, action="approve", comment="second look", confirm_override="yes")
    assert second.code == 303 and airlock.store.get(rid).state == review.RELEASED


async def test_a_policy_tightened_after_the_request_leaves_only_return_or_reject(web, airlock, people):
    rid = submit(airlock, people, "alice", _weights(2), kind="weights", name="m.safetensors")
    wait_state(airlock, rid, review.IN_REVIEW)
    tightened = {**SITE, "projects": [{**p} for p in SITE["projects"]]}
    del tightened["projects"][0]["self_reported_weights"], tightened["projects"][0]["self_reported_reason"]
    airlock.site = parse(tightened, overrides={"workspace": {"state_dir": str(airlock.site.state_dir)}})
    page = (await web.fetch("sam", f"requests/{rid}")).body.decode()
    assert 'id="refused"' in page and 'value="approve"' not in page and 'value="reject"' in page
    r = await web.decide("sam", rid, "approve", "looks fine")
    assert r.code == 403 and b"project oncology does not release self-reported weights" in r.body
    assert airlock.store.get(rid).state == review.IN_REVIEW
    assert (await web.decide("sam", rid, "reject", "the project no longer takes these")).code == 303
    assert airlock.store.get(rid).state == review.REJECTED


def test_only_a_training_jobs_request_has_a_record_to_download(airlock, people):
    from tests.airlock.helpers import GOOD

    rid = submit(airlock, people, "alice", GOOD)
    with pytest.raises(LookupError, match="holds no signed training record"):
        airlock.download(rid, username="alice", scopes={"custom:airlock:download"}, part="record")
