"""The airlock's metrics: its queues. Requests by state and kind, how long the oldest request has waited for a
steward, and requests waiting for the automatic checks. Read at each scrape from the store and the check
worker; no label names a requester, a steward or a request.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import Metric

from paitient.config import AIRLOCK_KINDS
from paitient.rules import review
from paitient.services.airlock.store import Store
from paitient.services.kit.metrics import MetricsRegistry, Reading, gauge

if TYPE_CHECKING:
    from paitient.services.airlock.core import Airlock


def read_store(store: Store, now: float | None = None) -> Iterator[Metric]:
    counts = store.counts()
    kinds = sorted(set(AIRLOCK_KINDS) | {kind for _, kind in counts})
    yield gauge(
        "paitient_airlock_requests",
        "Requests by state (submitted, checking, in_review, released, rejected, returned) and kind",
        ("state", "kind"),
        [((state, kind), counts.get((state, kind), 0)) for state in review.STATES for kind in kinds],
    )
    oldest = store.oldest_in(review.IN_REVIEW)
    waited = 0.0 if oldest is None else max(0.0, (now or time.time()) - oldest)
    yield gauge(
        "paitient_airlock_review_wait_seconds",
        "How long the request waiting longest for a steward's decision has waited (0: none waits)",
        (),
        [((), waited)],
    )


def airlock_registry(airlock: Airlock) -> MetricsRegistry:
    """The airlock service's registry: the store's queues and the check worker's."""

    def read() -> Iterator[Metric]:
        yield from read_store(airlock.store)
        yield gauge(
            "paitient_airlock_checks_queued",
            "Requests waiting for (or in) the automatic checks",
            (),
            [((), airlock.checks_queued())],
        )
        yield gauge(
            "paitient_airlock_records_waiting",
            "Audit records the trail has not taken yet, held in the airlock's database (0 while it records)",
            (),
            [((), airlock.backlog.waiting)],
        )

    registry = MetricsRegistry()
    registry.register(Reading(read))
    return registry
