"""The training runner's metrics: its queue. Jobs per project and state, how long the oldest queued job has
waited, and the workers. Read from the queue's store at each scrape; no label names a researcher or a job.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.metrics_core import Metric

from paitient.services.jobs.store import STATES, JobStore
from paitient.services.kit.metrics import MetricsRegistry, Reading, gauge


def read_queue(site: Any, store: JobStore, now: float | None = None) -> Iterator[Metric]:
    counts = store.counts()
    projects = sorted({p.name for p in site.projects} | {project for project, _ in counts})
    yield gauge(
        "paitient_jobs",
        "Training jobs by state (queued, running, done, failed, cancelled)",
        ("project", "state"),
        [((project, state), counts.get((project, state), 0)) for project in projects for state in STATES],
    )
    oldest = store.oldest_queued()
    waited = 0.0 if oldest is None else max(0.0, (now or time.time()) - oldest)
    yield gauge(
        "paitient_jobs_queue_wait_seconds",
        "How long the job waiting longest for a worker has waited (0: none waits)",
        (),
        [((), waited)],
    )
    yield gauge("paitient_jobs_workers", "Worker threads ([jobs] concurrency)", (), [((), site.jobs.concurrency)])


def jobs_registry(site: Any, store: JobStore) -> MetricsRegistry:
    registry = MetricsRegistry()
    registry.register(Reading(lambda: read_queue(site, store)))
    return registry
