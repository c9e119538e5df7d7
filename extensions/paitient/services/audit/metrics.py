"""The audit service's metrics: how long an event waits for its durable record, and the trail's state.

Counted by the process: the time from a user-side event's arrival (a server's or kernel's ``record``) to its
record being written and fsync'd, events recorded per action and outcome, and events the trail could not take.
Read from the trail at each scrape, whoever wrote it (the hub, every service): its records (the last record's
seq), when the last record became durable, and its size on disk. The egress service reports its own queue of
records waiting for the trail (``paitient_egress_audit_*``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.metrics_core import Metric

from paitient.services.audit import trail_dir
from paitient.services.audit.writer import read_head, trail_files
from paitient.services.kit.metrics import MetricsRegistry, Reading, gauge

APPEND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def read_trail(directory: Path) -> Iterator[Metric]:
    """The trail's numbers; zeros where it cannot be read (a broken trail is the writers' to report)."""
    try:
        head = read_head(directory)
        written = (directory / "head.json").stat().st_mtime
    except OSError:
        head, written = None, 0.0
    yield gauge(
        "paitient_audit_records", "Records in the trail (the last record's seq)", (), [((), head["seq"] if head else 0)]
    )
    yield gauge(
        "paitient_audit_last_record_timestamp_seconds",
        "When the trail's last record became durable (Unix time; 0: no record yet)",
        (),
        [((), written)],
    )
    size = 0
    try:
        for _, path in trail_files(directory):
            size += path.stat().st_size
    except OSError:
        pass
    yield gauge("paitient_audit_trail_bytes", "Size of the trail's files", (), [((), size)])


class AuditMetrics:
    """The audit service's registry and the instruments its ``record`` operation updates."""

    def __init__(self, site: Any, registry: MetricsRegistry | None = None):
        self.registry = r = registry or MetricsRegistry()
        self.append_seconds = Histogram(
            "paitient_audit_append_seconds",
            "Time from a user-side event's arrival to its record being durable in the trail (written, fsync'd)",
            buckets=APPEND_BUCKETS,
            registry=r,
        )
        self.events = Counter(
            "paitient_audit_user_events",
            "Events recorded from users' servers and kernels, by action and outcome",
            ["action", "outcome"],
            registry=r,
        )
        self.failures = Counter(
            "paitient_audit_append_failures",
            "User-side events the trail could not take (the sender was told)",
            registry=r,
        )
        directory = trail_dir(site)
        r.register(Reading(lambda: read_trail(directory)))
