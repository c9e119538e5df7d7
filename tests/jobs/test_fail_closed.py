"""No job runs unrecorded: while the audit trail cannot be written a submission is refused, a queued job stays
queued untouched (nothing reserved, no data read), and a finished one is not settled or released; once the
trail records again, each goes on by itself.

The runner is root-side and writes the trail itself; the trail is taken down for real
(:func:`tests.trail.trail_down`).
"""

import logging
import time

import pytest

from paitient.kernel.jobs import JobsClient, submit
from paitient.kernel.jobs.client import JobsUnavailable
from paitient.services.jobs.runner import WAITING_FOR_TRAIL
from tests.jobs.jobsworld import jobs_world
from tests.jobs.test_runner import model, request
from tests.trail import trail_down, trail_records

pytestmark = pytest.mark.e2e


@pytest.fixture
def world(world_tmp, make_system_user, monkeypatch):
    """The ledger and the jobs socket on a published demo site; the runner made but not started."""
    with jobs_world(world_tmp / "state", make_system_user("jobs").pw_name, monkeypatch) as w:
        yield w.site, w.store, w.ledger, w.runner


def job_records(site, job_id: str) -> list[dict]:
    """The trail's ``jobs.*`` records of one job, in the chain's order."""
    return [r for r in trail_records(site, "jobs.") if r["object"] == job_id]


def ledger_runs(ledger, job_id: str) -> list[dict]:
    return [r for r in ledger.runs("oncology") if r["run_id"] == f"job:{job_id}"]


def wait_for(what, timeout: float, message: str):
    deadline = time.monotonic() + timeout
    while not (got := what()):
        assert time.monotonic() < deadline, message
        time.sleep(0.1)
    return got


def test_a_submission_is_refused_while_the_trail_is_down_and_accepted_once_it_is_back(world):
    site, store, ledger, runner = world
    with trail_down(site):
        with pytest.raises(JobsUnavailable, match="the job was not submitted: the audit trail cannot record it") as e:
            submit(model(), **request(epochs=2))
        assert e.value.code == "unavailable"
        (refused,) = JobsClient().list()
        assert refused["state"] == "cancelled"  # never queued for the runner
    assert job_records(site, refused["id"]) == []
    job = submit(model(), **request(epochs=2))
    assert job.state == "queued"
    ((record,),) = [job_records(site, job.id)]
    assert record["action"] == "jobs.submit" and record["actor"] == "alice"


def test_a_queued_job_waits_untouched_while_the_trail_is_down_and_runs_once_it_is_back(world):
    """Attack: start a training job while auditing is down. Nothing of it happens until its start is recorded."""
    site, store, ledger, runner = world
    job = submit(model(), **request(epochs=2))
    with trail_down(site):
        runner.start()
        wait_for(lambda: store.get(job.id).reason == WAITING_FOR_TRAIL, 30, "the runner did not try the job")
        time.sleep(5)  # two more tries at the runner's pace
        held = store.get(job.id)
        assert held.state == "queued" and held.started is None and held.reservation == "" and held.progress == {}
        assert ledger_runs(ledger, job.id) == []  # no budget reserved
        assert not store.out_dir(job.id).exists()
        assert "waiting: the audit trail cannot record the job's start" in job.reason  # what the researcher sees
    job.wait(timeout=300, widget=False, poll=0.5)
    assert job.state == "done" and job.reason == ""
    runs = [(r["action"], r["details"]["state"]) for r in job_records(site, job.id) if r["action"] == "jobs.run"]
    assert runs == [("jobs.run", "running"), ("jobs.run", "done")]  # the failed tries wrote nothing
    (run,) = ledger_runs(ledger, job.id)
    assert run["state"] == "settled"


def test_a_finished_job_is_not_settled_or_released_until_its_end_is_recorded(world, caplog):
    site, store, ledger, runner = world
    caplog.set_level(logging.ERROR, logger="paitient.services.jobs")
    runner.start()
    job = submit(model(), **request(epochs=5))
    wait_for(lambda: store.get(job.id).reservation, 120, "the job reserved no budget")
    with trail_down(site):  # while it trains
        wait_for(lambda: f"end of {job.id} (done) not recorded" in caplog.text, 300, "the job did not finish")
        time.sleep(3)
        assert store.get(job.id).state == "running"
        (run,) = ledger_runs(ledger, job.id)
        assert run["state"] == "reserved"  # not settled
        with pytest.raises(Exception, match="only a finished job has a record"):
            JobsClient().call("record", {"job_id": job.id})
    job.wait(timeout=60, widget=False, poll=0.5)
    assert job.state == "done"
    (run,) = ledger_runs(ledger, job.id)
    assert run["state"] == "settled"
    states = [r["details"]["state"] for r in job_records(site, job.id) if r["action"] == "jobs.run"]
    assert states == ["running", "done"]
