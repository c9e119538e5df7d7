"""The queue's bounds: an account has at most ``[jobs] max_per_user`` jobs queued or running, workers take the
accounts waiting in turn, and a graph no job needs any more is removed. Against the real store on both
databases (SQLite, then PostgreSQL), and the cap through the real socket with the researcher's client."""

from __future__ import annotations

import threading

import pytest

from paitient.channel import ChannelError
from paitient.config import ConfigError, parse
from paitient.services.jobs.store import QUEUE_FULL, JobError, JobStore, QueueFull

GRAPH = "f" * 64


@pytest.fixture
def site_with(tmp_path, database):
    """A site on the parametrised database, with ``[jobs]`` as given."""

    def make(**jobs):
        state = tmp_path / "state"
        state.mkdir(mode=0o700, exist_ok=True)
        return parse({"workspace": {"state_dir": str(state)}, "database": database, "jobs": jobs})

    return make


@pytest.fixture
def open_store(site_with, opened_stores):
    """Opens the queue as the service does (``JobStore.for_site``), on a site with ``[jobs]`` as given."""
    return lambda **jobs: opened_stores(JobStore.for_site(site_with(**jobs)))


def put(store: JobStore, user: str, graph: str = GRAPH, **spec):
    return store.submit(username=user, project="onc", dataset="bc", spec=spec, graph_sha256=graph)


# -- the cap -------------------------------------------------------------------------------------------------


def test_the_cap_is_a_site_option_checked_when_the_site_is_read():
    assert parse({}).jobs.max_per_user == 4
    assert parse({"jobs": {"max_per_user": 1}}).jobs.max_per_user == 1
    for bad in (0, -1, 1001, 2.5, True, "4"):
        with pytest.raises(ConfigError, match="max_per_user"):
            parse({"jobs": {"max_per_user": bad}})
    with pytest.raises(ValueError, match="max_per_user must be a positive whole number"):
        JobStore("/nonexistent", max_per_user=0)


def test_the_job_over_the_cap_is_refused_saying_how_many_wait_and_is_admitted_once_one_ends(open_store):
    store = open_store()
    assert store.max_per_user == 4
    jobs = [put(store, "alice", n=n) for n in range(4)]
    with pytest.raises(QueueFull) as refused:
        put(store, "alice", n=4)
    e = refused.value
    assert isinstance(e, ChannelError) and isinstance(e, JobError) and e.code == QUEUE_FULL == "too_many_jobs"
    assert str(e) == (
        "the job was not submitted: you have 4 job(s) queued and 0 running, and an account may have 4 at once "
        "([jobs] max_per_user). Wait for one to end, or cancel one you no longer need with jobs.cancel(job) "
        "(jobs.list() shows yours), then submit again."
    )
    assert e.to_wire() == {"ok": False, "error": str(e), "code": "too_many_jobs"}  # what the socket sends
    assert len(store.of_user("alice")) == 4  # nothing queued for the refusal
    bob = put(store, "bob")  # another account is not held up by alice's cap
    running = store.claim()
    assert running is not None and running.id == jobs[0].id
    with pytest.raises(QueueFull, match="you have 3 job\\(s\\) queued and 1 running"):
        put(store, "alice")
    store.finish(running.id, "done")
    fifth = put(store, "alice", n=5)  # one ended: one more is admitted
    with pytest.raises(QueueFull):
        put(store, "alice")
    store.cancel(jobs[1].id, "alice")
    sixth = put(store, "alice", n=6)  # one cancelled: one more
    with pytest.raises(QueueFull):
        put(store, "alice")
    claimed = store.claim()  # failed ones count no more than done ones
    assert claimed is not None and claimed.id == bob.id  # bob, never served, before alice's next
    claimed = store.claim()
    assert claimed is not None and claimed.id == jobs[2].id
    store.finish(claimed.id, "failed", "x")
    assert put(store, "alice").state == "queued"
    assert {j.id for j in store.of_user("alice") if j.state in ("queued", "running")} >= {fifth.id, sixth.id}


def test_the_cap_is_the_sites(open_store):
    store = open_store(max_per_user=1)
    put(store, "alice")
    with pytest.raises(QueueFull, match="you have 1 job\\(s\\) queued and 0 running, and an account may have 1"):
        put(store, "alice")


def test_submissions_racing_at_the_cap_admit_exactly_the_cap(open_store):
    """24 threads on two stores (two engines, as two runner processes would have) submit for alice at once:
    the count and the row are one write transaction, so exactly the cap is queued and the rest refused."""
    stores = [open_store(), open_store()]
    put(stores[0], "alice")  # one already waits
    start = threading.Barrier(24)
    admitted: list[str] = []
    refused: list[QueueFull] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            start.wait(timeout=30)
            admitted.append(put(stores[i % 2], "alice", n=i).id)
        except QueueFull as e:
            refused.append(e)
        except BaseException as e:  # noqa: BLE001 -- reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and not any(t.is_alive() for t in threads)
    assert len(admitted) == 3 and len(refused) == 21
    assert stores[1].counts() == {("onc", "queued"): 4}
    assert all("an account may have 4 at once" in str(e) for e in refused)


def test_the_cap_and_the_turns_hold_across_a_restart(open_store):
    store = open_store()
    first = [put(store, "alice", n=n) for n in range(4)]
    bob = put(store, "bob")
    assert store.claim().id == first[0].id
    store.finish(first[0].id, "done")
    put(store, "alice", n=4)
    store.close()  # the runner stops; the queue is in the database
    store = open_store()
    assert store.recover() == []
    with pytest.raises(QueueFull, match="you have 4 job\\(s\\) queued and 0 running"):
        put(store, "alice")
    assert store.claim().id == bob.id  # alice was served last, before the restart
    assert store.claim().id == first[1].id


# -- the turns -----------------------------------------------------------------------------------------------


def drain(store: JobStore) -> list[str]:
    """Claim and finish one job at a time (one worker): the owners in the order they were served."""
    served = []
    while (job := store.claim()) is not None:
        served.append(job.username)
        store.finish(job.id, "done")
    return served


def test_one_worker_alternates_between_a_backlog_of_ten_and_a_single_job(open_store):
    store = open_store(max_per_user=10)
    for n in range(10):
        put(store, "alice", n=n)
    put(store, "bob")  # submitted after all ten of alice's
    assert drain(store) == ["alice", "bob"] + ["alice"] * 9


def test_one_worker_takes_the_accounts_waiting_in_turn(open_store):
    store = open_store(max_per_user=10)
    for n in range(6):
        put(store, "alice", n=n)
    for n in range(3):
        put(store, "bob", n=n)
    put(store, "carol")
    assert drain(store) == ["alice", "bob", "carol", "alice", "bob", "alice", "bob", "alice", "alice", "alice"]
    alice = sorted(store.of_user("alice"), key=lambda j: j.started or 0)
    assert [j.spec["n"] for j in alice] == list(range(6))  # each account's own jobs oldest first


def test_a_worker_takes_the_account_with_the_fewest_running_first(open_store):
    store = open_store(max_per_user=10)
    a = [put(store, "alice", n=n) for n in range(3)]
    bob = put(store, "bob")
    assert store.claim().id == a[0].id
    assert store.claim().id == bob.id  # alice has one running, bob none
    assert store.claim().id == a[1].id  # one running each, and only alice has one waiting
    store.finish(a[0].id, "done")
    carol = put(store, "carol")
    assert store.claim().id == carol.id  # none running beats alice's one and bob's one
    assert store.claim().id == a[2].id


def test_a_requeued_job_keeps_its_place_in_its_accounts_turn(open_store):
    store = open_store()
    a = [put(store, "alice", n=n) for n in range(2)]
    bob = put(store, "bob")
    assert store.claim().id == a[0].id
    store.requeue(a[0].id, "waiting for the trail")  # never started after all
    assert store.claim().id == a[0].id  # neither account served yet: the oldest
    store.finish(a[0].id, "done")
    assert store.claim().id == bob.id


# -- the graphs ----------------------------------------------------------------------------------------------


def keep(store: JobStore, tag: str) -> str:
    sha = tag * 64
    store.keep_graph(sha, b'{"graph": "%s"}' % tag.encode())
    return sha


def test_a_graph_goes_when_no_queued_running_or_done_job_names_it(open_store):
    store = open_store()
    done_g, failed_g, cancelled_g, shared_g = (keep(store, t) for t in "abcd")
    done = put(store, "alice", done_g)
    failed = put(store, "alice", failed_g)
    cancelled = put(store, "alice", cancelled_g)
    shared = put(store, "bob", keep(store, "d"))  # a second submission of the same graph
    cancelled_shared = put(store, "bob", shared_g)
    paths = {sha: store.graph_path(sha) for sha in (done_g, failed_g, cancelled_g, shared_g)}
    assert all(p.exists() for p in paths.values())

    store.cancel(cancelled.id, "alice")
    assert not paths[cancelled_g].exists()  # cancelled before it ran: nothing will read it
    store.cancel(cancelled_shared.id, "bob")
    assert paths[shared_g].exists()  # bob's other job still waits with it
    assert [store.claim().id for _ in range(3)] == [done.id, shared.id, failed.id]  # alice, bob, alice
    store.finish(done.id, "done")
    store.finish(failed.id, "failed", "it failed")
    assert paths[done_g].exists()  # the airlock lists a done job's graph to the steward on release
    assert not paths[failed_g].exists()
    store.requeue(shared.id, "waiting")  # back in the queue: still needed
    assert paths[shared_g].exists()
    store.cancel(shared.id, "bob")
    assert not paths[shared_g].exists()
    assert sorted(p.name for p in (store.root / "graphs").iterdir()) == [f"{done_g}.json"]


def test_a_refused_submission_leaves_no_graph_and_the_job_over_the_cap_is_none(open_store):
    store = open_store(max_per_user=1)
    waiting = put(store, "alice", keep(store, "a"))
    over = keep(store, "b")
    with pytest.raises(QueueFull):
        put(store, "alice", over)
    assert not store.graph_path(over).exists()
    same = keep(store, "a")  # the same graph as the job that waits: kept for it
    with pytest.raises(QueueFull):
        put(store, "alice", same)
    assert store.graph_path(same).exists() and store.get(waiting.id).state == "queued"


def test_a_graph_kept_for_a_submission_not_yet_queued_is_not_removed(open_store):
    """The service keeps the graph, then submits: a sweep between the two (another job of that graph
    cancelled meanwhile) leaves it, and the job submitted then finds it."""
    store = open_store()
    sha = keep(store, "a")
    first = put(store, "alice", sha)
    keep(store, "a")  # bob's submission of the same graph is on its way
    store.cancel(first.id, "alice")
    assert store.sweep_graphs() == [] and store.graph_path(sha).exists()
    bobs = put(store, "bob", sha)
    assert store.sweep_graphs() == [] and store.graph_path(sha).exists()
    store.cancel(bobs.id, "bob")
    assert not store.graph_path(sha).exists()


def test_a_start_removes_the_graphs_no_job_keeps(open_store):
    store = open_store()
    kept = put(store, "alice", keep(store, "a"))
    orphan = store.root / "graphs" / ("b" * 64 + ".json")
    orphan.write_bytes(b"{}")  # of a job from before this sweep, or of a submission whose insert failed
    other = store.root / "graphs" / "notes.txt"
    other.write_text("not a graph")
    store.close()
    store = open_store()
    store.recover()
    assert not orphan.exists() and other.exists() and store.graph_path(kept.graph_sha256).exists()


# -- through the socket --------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_the_researcher_gets_the_refusal_and_can_submit_again_after_a_cancel(world_tmp, make_system_user, monkeypatch):
    """The real service on its socket (the runner not started: the jobs wait) and the researcher's client."""
    from paitient.kernel import jobs
    from tests.jobs.jobsworld import jobs_world
    from tests.jobs.test_runner import model, request

    with jobs_world(world_tmp / "state", make_system_user("jobs").pw_name, monkeypatch) as world:
        submitted = [jobs.submit(model(), **request(epochs=2)) for _ in range(4)]
        with pytest.raises(jobs.ChannelError) as refused:
            jobs.submit(model(), **request(epochs=2))
        assert refused.value.code == "too_many_jobs"
        assert "you have 4 job(s) queued and 0 running" in str(refused.value)
        assert "jobs.cancel(job)" in str(refused.value)
        assert len(jobs.list()) == 4
        jobs.cancel(submitted[0])
        again = jobs.submit(model(), **request(epochs=2))
        assert again.state == "queued"
        assert world.store.graph_path(world.store.get(again.id).graph_sha256).exists()


@pytest.mark.e2e
def test_an_account_is_refused_before_its_graph_is_checked_at_its_cap_or_while_another_is(
    world_tmp, make_system_user, monkeypatch
):
    """Checking a graph holds the service's one graph-building lock: about 12 s for the largest a request may
    send. A stream of submissions from one account, each over the cap or failing at the end (and so never
    queued), kept every other account's submissions, and the workers' checks, waiting behind it. Now an
    account's graphs are checked one at a time, and the cap is asked before a graph is checked."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from paitient.kernel import jobs
    from paitient.services.jobs import graph as graph_module
    from tests.jobs.jobsworld import jobs_world
    from tests.jobs.test_runner import model, request

    real, checked = graph_module.load_graph, []
    checking, go_on = threading.Event(), threading.Event()

    def held(program, **kw):
        checked.append(1)
        checking.set()
        assert go_on.wait(60)
        return real(program, **kw)

    monkeypatch.setattr(graph_module, "load_graph", held)
    with jobs_world(world_tmp / "state", make_system_user("jobs").pw_name, monkeypatch), ThreadPoolExecutor(1) as pool:
        first = pool.submit(jobs.submit, model(), **request(epochs=2))
        assert checking.wait(60)
        with pytest.raises(jobs.ChannelError) as busy:
            jobs.submit(model(), **request(epochs=2))
        assert busy.value.code == "busy" and "another model of yours is being checked" in str(busy.value)
        assert len(checked) == 1
        go_on.set()
        assert first.result(60).state == "queued"
        for _ in range(3):
            jobs.submit(model(), **request(epochs=2))
        assert len(checked) == 4
        with pytest.raises(jobs.ChannelError) as full:
            jobs.submit(model(), **request(epochs=2))
        assert full.value.code == "too_many_jobs" and len(checked) == 4  # refused before its graph was checked
