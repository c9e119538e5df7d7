"""Without its audit record nothing happens in the airlock: a request is not filed, a decision is not taken,
an automatic release waits for a steward; once the trail records again, everything goes through."""

from __future__ import annotations

import time

import pytest

from paitient.channel import ChannelError
from paitient.rules import review
from paitient.services.airlock.metrics import airlock_registry
from paitient.services.airlock.service import Airlock, AirlockSettings
from tests.airlock.helpers import GOOD, STEWARD, csv_bytes, registry_counts, submit, wait_state
from tests.scrape import value


class Trail:
    """An audit writer that can be taken down: records what it wrote, raises while it is down."""

    def __init__(self) -> None:
        self.down = False
        self.refuse: set[str] = set()
        """Actions it cannot record even while up."""
        self.records: list[dict] = []

    def __call__(self, **record) -> None:
        if self.down or record["action"] in self.refuse:
            raise OSError("the audit service does not answer")
        self.records.append(record)


@pytest.fixture
def trail_and_airlock(site, ledger_service, people):
    trail = Trail()
    airlock = Airlock(site, settings=AirlockSettings(audit_timeout=300), emit=trail)
    airlock.start()
    yield trail, airlock
    airlock.stop()


def test_a_request_is_not_filed_while_the_trail_is_down(trail_and_airlock, people):
    trail, airlock = trail_and_airlock
    trail.down = True
    with pytest.raises(ChannelError, match="the audit trail cannot record this request") as refused:
        submit(airlock, people, "alice", GOOD)
    assert refused.value.code == "unavailable"
    assert airlock.store.list(username="alice") == []  # nothing filed
    trail.down = False
    rid = submit(airlock, people, "alice", GOOD)
    assert [r.id for r in airlock.store.list(username="alice")] == [rid]
    assert any(r["action"] == "airlock.request" and r["object"] == rid for r in trail.records)


def test_a_decision_is_not_taken_while_the_trail_is_down(trail_and_airlock, people):
    trail, airlock = trail_and_airlock
    rid = submit(airlock, people, "alice", GOOD)
    wait_state(airlock, rid, review.IN_REVIEW)
    trail.down = True
    with pytest.raises(review.TransitionError, match="cannot record this decision") as refused:
        airlock.decide(rid, username="sam", scopes=set(STEWARD), action="approve", comment="counts fine")
    assert refused.value.status == 503
    assert airlock.store.get(rid).state == review.IN_REVIEW and airlock.store.events(rid, "decision") == []
    trail.down = False
    airlock.decide(rid, username="sam", scopes=set(STEWARD), action="approve", comment="counts fine")
    assert airlock.store.get(rid).state == review.RELEASED
    (record,) = [r for r in trail.records if r["action"] == "airlock.decision" and r["outcome"] == "ok"]
    assert record["object"] == rid and record["details"]["state"] == review.RELEASED


def test_an_automatic_release_waits_for_a_steward_while_the_trail_is_down(site, trail_and_airlock, people):
    trail, airlock = trail_and_airlock
    trail.refuse = {"airlock.decision"}
    df = registry_counts(site)
    recipe = {"dataset": "counts", "index": ["age_band"], "aggfunc": "count"}
    table = csv_bytes(df.groupby("age_band").size().rename("n").reset_index())
    rid = submit(airlock, people, "ren", table, recipe=recipe)  # registry releases recomputed counts itself
    airlock.wait_idle()
    assert airlock.store.get(rid).state == review.IN_REVIEW
    moved = airlock.store.events(rid, "state")
    assert "not_automatic" not in moved[-1].data  # it would have left, but for the trail
    assert not any(e.data.get("automatic") for e in moved)
    assert airlock.store.get(rid).filename == "t.csv"  # and its file is still the one filed
    trail.refuse = set()
    again = submit(airlock, people, "ren", table, name="again.csv", recipe=recipe)
    airlock.wait_idle()
    assert airlock.store.get(again).state == review.RELEASED  # with the trail back, as before


def test_what_the_airlock_refused_while_the_trail_was_down_is_recorded_once_it_is_back_after_a_restart(
    site, ledger_service, people
):
    """A refusal needs no record first (nothing happens), but it must not go unrecorded: its record waits,
    held in the airlock's database, and a new airlock service writes it once the trail takes records."""
    trail = Trail()
    airlock = Airlock(site, settings=AirlockSettings(audit_timeout=300), emit=trail)
    airlock.start()
    rid = submit(airlock, people, "alice", GOOD)
    wait_state(airlock, rid, review.IN_REVIEW)
    trail.down = True
    with pytest.raises(PermissionError, match="not released"):
        airlock.download(rid, username="alice", scopes=set())
    assert airlock.backlog.waiting == 1
    assert value(airlock_registry(airlock), "paitient_airlock_records_waiting") == 1
    airlock.stop()  # a service stopped or killed now: the record is in the database, not only in its memory
    trail.down = False
    again = Airlock(site, settings=AirlockSettings(audit_timeout=300), emit=trail)
    assert again.backlog.waiting == 1
    again.start()
    try:
        deadline = time.monotonic() + 30
        while again.backlog.waiting and time.monotonic() < deadline:
            time.sleep(0.1)
        (record,) = [r for r in trail.records if r["action"] == "airlock.download"]
        assert record["outcome"] == "denied" and record["object"] == rid
        assert "not released" in record["details"]["reason"] and "happened" in record["details"]
        assert again.backlog.waiting == 0
    finally:
        again.stop()


def test_a_graph_is_not_approved_while_the_trail_is_down(trail_and_airlock):
    """A steward's approval of a graph for automatic release counts only once its ``airlock.graph`` record is
    written: with the trail down the steward is told why (503) and the graph's standing is unchanged."""
    trail, airlock = trail_and_airlock
    req = airlock.store.create(
        project="oncology", username="alice", account="pt-alice", uid=30001, kind="weights",
        filename="j.safetensors", sha256="ab" * 32, size=1, justification="a model", meta={"job": "job-abcdef"},
    )  # fmt: skip
    graph = "cd" * 32
    airlock.store.record_checks(
        req.id, [{"check": "certified", "status": "pass", "details": {"record": {"graph_sha256": graph}}}]
    )
    airlock.graph_read(airlock.store.get(req.id), "sam")
    trail.down = True
    with pytest.raises(review.TransitionError, match="cannot record this right now, so it is not taken") as refused:
        airlock.decide_graph(req.id, username="sam", scopes={"custom:airlock:review"}, action="approve",
                             reason="read whole: one linear layer")  # fmt: skip
    assert refused.value.status == 503
    standing = airlock.graph_standing(airlock.store.get(req.id))
    assert standing is not None and standing.sha256 == graph
    assert not standing.approved and standing.approvals == ()
    assert airlock.store.graph_approvals("oncology", graph) == []
    trail.down = False
    airlock.decide_graph(req.id, username="sam", scopes={"custom:airlock:review"}, action="approve",
                         reason="read whole: one linear layer")  # fmt: skip
    assert airlock.graph_standing(airlock.store.get(req.id)).approved
    (record,) = [r for r in trail.records if r["action"] == "airlock.graph"]
    assert record["object"] == req.id and record["details"]["graph_sha256"] == graph
