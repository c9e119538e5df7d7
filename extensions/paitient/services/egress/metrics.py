"""The egress service's metrics: what reached browsers and what was withheld, over all users together.

Counted by the process since it started (by channel, verdict and reason): bytes forwarded, pieces checked,
pieces withheld, the time a verdict takes, and how long an output's record waits to be durable in the audit
trail. Read from the store at each scrape: today's (UTC) totals over every user, which survive a restart.
Gauges: records waiting for the trail, whether the trail records, counts waiting for the store (today's
totals lag them), users' servers connected, row indexes waiting to be built. Counted too: the row indexes the
service built itself (:mod:`.indexer`), by outcome.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

from paitient.services.egress.indexer import Built
from paitient.services.egress.store import EgressStore, today
from paitient.services.kit.metrics import MetricsRegistry, Reading, gauge

CHECK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Watched(Protocol):
    """What the metrics read of the service (:class:`~paitient.services.egress.service.EgressService`)."""

    store: EgressStore
    audit_ok: bool

    def pending_records(self) -> int: ...

    def pending_counts(self) -> int: ...


class EgressMetrics:
    """The service's registry and the instruments :class:`EgressService` updates."""

    def __init__(self, service: Watched, registry: MetricsRegistry | None = None):
        self.registry = r = registry or MetricsRegistry()
        self.bytes = Counter(
            "paitient_egress_bytes", "Bytes of output forwarded to researchers' browsers", ["channel"], registry=r
        )
        self.pieces = Counter(
            "paitient_egress_pieces",
            "Pieces of output the gate asked about, by verdict (forward, withhold)",
            ["channel", "verdict"],
            registry=r,
        )
        self.withheld = Counter(
            "paitient_egress_withheld_outputs",
            "Pieces of output withheld, by reason (rows, daily_rows, daily_bytes, unchecked)",
            ["channel", "reason"],
            registry=r,
        )
        self.check_seconds = Histogram(
            "paitient_egress_check_seconds",
            "Time to decide one piece of output (row matching, the user's day, the verdict)",
            buckets=CHECK_BUCKETS,
            registry=r,
        )
        self.audit_lag = Histogram(
            "paitient_egress_audit_lag_seconds",
            "Time from an egress record queued to it being durable in the audit trail",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.audit_failures = Counter(
            "paitient_egress_audit_failures", "Egress records the audit trail could not take", registry=r
        )
        pending = Gauge(
            "paitient_egress_audit_pending_records", "Egress records waiting for the audit trail", registry=r
        )
        pending.set_function(lambda: service.pending_records())
        counts = Gauge(
            "paitient_egress_counts_waiting",
            "Outputs counted and not yet in the store of the counts; beyond a bound the service refuses checks",
            registry=r,
        )
        counts.set_function(lambda: service.pending_counts())
        up = Gauge(
            "paitient_egress_trail_up",
            "1 while the audit trail records egress; 0 while it does not, and outputs above fail_closed_bytes are "
            "withheld",
            registry=r,
        )
        up.set_function(lambda: 1.0 if service.audit_ok else 0.0)
        self.connections = Gauge(
            "paitient_egress_connections", "Users' servers connected to the egress service now", registry=r
        )
        self.index_builds = Counter(
            "paitient_egress_index_builds",
            "Row-detection indexes the service built itself for published versions without one, by outcome",
            ["outcome"],
            registry=r,
        )
        self.index_waiting = Gauge(
            "paitient_egress_index_builds_waiting",
            "Published versions whose row index the service is building or will build; outputs of their projects "
            "are unchecked until it is built",
            registry=r,
        )
        r.register(Reading(lambda: read_today(service.store)))

    def index_built(self, built: Built) -> None:
        self.index_builds.labels("ok" if built.ok else "failed").inc()


def read_today(store: EgressStore) -> Iterator[Metric]:
    """Today's (UTC) totals over every user, from the store."""
    t = store.totals(today())
    yield gauge(
        "paitient_egress_today_bytes", "Bytes forwarded to browsers today (UTC), all users", (), [((), t.bytes)]
    )
    yield gauge(
        "paitient_egress_today_outputs", "Outputs forwarded to browsers today (UTC), all users", (), [((), t.outputs)]
    )
    yield gauge(
        "paitient_egress_today_withheld_outputs",
        "Outputs withheld today (UTC), all users",
        (),
        [((), t.withheld)],
    )
    yield gauge("paitient_egress_today_users", "Users who received output today (UTC)", (), [((), t.users)])
