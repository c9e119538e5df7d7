"""The airlock's metrics: requests by state and kind as they move, how long review waits, the check queue."""

from __future__ import annotations

import pytest

from paitient.services.airlock.core import Airlock
from paitient.services.airlock.metrics import airlock_registry, read_store
from paitient.services.airlock.store import Store
from paitient.services.kit.metrics import MetricsRegistry, Reading
from tests.scrape import text, value


def file_request(store: Store, kind: str = "table", user: str = "alice"):
    """A request as the socket files it, naming a file the store does not hold: its checks fail (an internal
    error), and it goes to a steward."""
    return store.create(
        project="oncology",
        username=user,
        account=f"pt-{user}",
        uid=30001,
        kind=kind,
        filename="counts.csv",
        sha256="ab" * 32,
        size=10,
        justification="for the paper",
        meta={},
    )


def test_requests_move_from_submitted_to_review_in_the_numbers(site):
    airlock = Airlock(site)
    registry = airlock_registry(airlock)
    file_request(airlock.store)
    file_request(airlock.store, kind="figure", user="carol")
    assert value(registry, "paitient_airlock_requests", state="submitted", kind="table") == 1
    assert value(registry, "paitient_airlock_requests", state="submitted", kind="figure") == 1
    assert value(registry, "paitient_airlock_requests", state="in_review", kind="table") == 0
    assert value(registry, "paitient_airlock_review_wait_seconds") == 0
    airlock.start()  # the worker takes up what waits for its checks
    try:
        airlock.wait_idle()
        assert value(registry, "paitient_airlock_checks_queued") == 0
        assert value(registry, "paitient_airlock_requests", state="submitted", kind="table") == 0
        assert value(registry, "paitient_airlock_requests", state="in_review", kind="table") == 1
        assert value(registry, "paitient_airlock_requests", state="in_review", kind="figure") == 1
        assert value(registry, "paitient_airlock_review_wait_seconds") >= 0
        body = text(registry)
        assert "alice" not in body and "carol" not in body and "counts.csv" not in body
    finally:
        airlock.stop()


def test_review_wait_is_the_oldest_request_in_review(site):
    store = Store.for_site(site)
    first, second = file_request(store), file_request(store)
    for req in (first, second):
        store.transition(req.id, "checking", actor="airlock")
        store.transition(req.id, "in_review", actor="airlock")
    oldest = store.get(first.id).updated
    waited = MetricsRegistry()
    waited.register(Reading(lambda: read_store(store, now=oldest + 3600)))
    assert value(waited, "paitient_airlock_review_wait_seconds") == pytest.approx(3600)
    # a steward's rejection ends the first one's wait; the second one's is what is left
    decision = store.decide(
        first.id, reviewer="sam", action="reject", comment="too fine", may_review=True, approvals_needed=1
    )
    assert decision.new_state == "rejected"
    left = oldest + 3600 - store.get(second.id).updated
    assert value(waited, "paitient_airlock_review_wait_seconds") == pytest.approx(left)
    assert value(waited, "paitient_airlock_requests", state="rejected", kind="table") == 1
    assert value(waited, "paitient_airlock_requests", state="in_review", kind="table") == 1
