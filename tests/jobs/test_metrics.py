"""The runner's metrics: its queue per project and state, and how long the oldest queued job has waited."""

from __future__ import annotations

import pytest

from paitient.config import parse
from paitient.services.jobs.metrics import jobs_registry, read_queue
from paitient.services.jobs.store import JobStore
from paitient.services.kit.metrics import MetricsRegistry, Reading
from tests.scrape import text, value


@pytest.fixture
def site(world_tmp):
    state = world_tmp / "state"
    state.mkdir(mode=0o755)
    return parse(
        {
            "workspace": {"state_dir": str(state)},
            "projects": [
                {"name": "oncology", "group": "oncology", "datasets": ["breast_cancer"]},
                {"name": "cardio", "group": "cardio", "datasets": ["diabetes"]},
            ],
        }
    )


def submit(store: JobStore, user: str, project: str = "oncology"):
    return store.submit(username=user, project=project, dataset="breast_cancer", spec={}, graph_sha256="0" * 64)


def test_jobs_move_through_the_queue_in_the_numbers(site):
    store = JobStore(site.state_dir)
    registry = jobs_registry(site, store)
    try:
        assert value(registry, "paitient_jobs", project="oncology", state="queued") == 0
        first, _ = submit(store, "alice"), submit(store, "bob")
        submit(store, "carol", "cardio")
        assert value(registry, "paitient_jobs", project="oncology", state="queued") == 2
        assert value(registry, "paitient_jobs", project="cardio", state="queued") == 1
        claimed = store.claim()
        assert claimed is not None and claimed.id == first.id
        assert value(registry, "paitient_jobs", project="oncology", state="queued") == 1
        assert value(registry, "paitient_jobs", project="oncology", state="running") == 1
        store.finish(claimed.id, "done")
        assert value(registry, "paitient_jobs", project="oncology", state="running") == 0
        assert value(registry, "paitient_jobs", project="oncology", state="done") == 1
        assert value(registry, "paitient_jobs_workers") == site.jobs.concurrency
        assert "alice" not in text(registry) and first.id not in text(registry)
    finally:
        store.close()


def test_the_oldest_queued_job_says_how_long_the_queue_waits(site):
    store = JobStore(site.state_dir)
    try:
        waited = MetricsRegistry()
        job = submit(store, "alice")
        waited.register(Reading(lambda: read_queue(site, store, now=job.created + 90)))
        assert value(waited, "paitient_jobs_queue_wait_seconds") == pytest.approx(90)
        store.cancel(job.id, "alice")
        assert value(waited, "paitient_jobs_queue_wait_seconds") == 0
    finally:
        store.close()


def test_the_runner_serves_its_metrics_behind_the_hub_but_lists_no_page(site):
    from paitient.services.jobs.service import hub_service

    entry = hub_service(site, "/opt/paitient/venv/bin/python", port=18124)
    assert entry["url"] == "http://127.0.0.1:18124" and entry["display"] is False
    assert entry["oauth_client_allowed_scopes"] == []  # no scope of its own for anyone's token
    python = "/opt/paitient/venv/bin/python"
    assert entry["command"] == [python, "-m", "paitient.cli", "service", "jobs", f"--state-dir={site.state_dir}"]
