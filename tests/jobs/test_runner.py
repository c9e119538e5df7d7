"""The runner for real: the demo data published, the ledger on its socket, the worker in the kernels' sandbox
as the runner's own account; a job from submit to a signed record, and the ways one ends without."""

import json
import logging
import re
from http.cookies import SimpleCookie

import pytest
import torch
from safetensors.torch import load as load_weights
from torch import nn

from paitient.config import load
from paitient.kernel.jobs import Job, JobFailed, JobsClient, submit
from paitient.ops.demodata import publish_demo
from paitient.registry import Member, Registry
from paitient.rules import training_record
from paitient.services.airlock import views
from paitient.services.airlock.settings import SCOPE_DOWNLOAD, SCOPE_REVIEW
from paitient.services.jobs import keys
from paitient.services.kit.channel import ChannelServer
from paitient.services.kit.process import socket_path
from paitient.services.ledger.service import LedgerService
from paitient.services.ledger.store import Ledger
from tests import rootmember
from tests.jobs.jobsworld import jobs_world

pytestmark = pytest.mark.e2e

MARK = 123.456


@pytest.fixture
def world(world_tmp, make_system_user, monkeypatch):
    from paitient.services.airlock.core import Airlock
    from paitient.services.airlock.settings import AirlockSettings

    with jobs_world(world_tmp / "state", make_system_user("jobs").pw_name, monkeypatch) as w:
        airlock = Airlock(w.site, settings=AirlockSettings(audit_timeout=300))
        airlock.start()
        try:
            w.serve(socket_path(w.site, "airlock"), airlock.handlers())
            w.runner.start()
            yield w.site, w.store, w.ledger, airlock
        finally:
            w.runner.stop()
            airlock.stop()


def model() -> nn.Module:
    m = nn.Sequential(nn.Linear(30, 2))
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(MARK)  # what the notebook put in the weights never reaches the release
    return m


def standardise(site) -> list[dict]:
    """What a researcher computes in the notebook and passes as constants: each feature's mean and spread, to
    the four significant digits a request takes (and the catalogue keeps)."""
    import pyarrow.parquet as pq

    frame = pq.read_table(site.data_root / "oncology" / "breast_cancer" / "current" / "data.parquet").to_pandas()
    columns = [c for c in frame.columns if c != "target" and frame[c].dtype.kind == "f"]

    def cut(v) -> float:
        return float(f"{v:.4g}")

    return [{"op": "standardise", "columns": columns, "mean": [cut(frame[c].mean()) for c in columns],
             "std": [cut(frame[c].std()) for c in columns]}]  # fmt: skip


def request(**change):
    base = dict(dataset="breast_cancer", target="target", epochs=10, batch_size=64, max_grad_norm=1.0,
                target_epsilon=1.0, lr=0.5)  # fmt: skip
    return {**base, **change}


def test_a_job_trains_under_dp_and_its_record_verifies(world):
    site, store, ledger, gate = world
    columns = standardise(site)[0]["columns"]
    # The mean and spread from the catalogue the ingest wrote, not from the notebook.
    job = submit(model(), **request(preprocessing=[{"op": "standardise", "columns": columns}]))
    assert isinstance(job, Job) and job.state in ("queued", "running", "done")
    job.wait(timeout=300, widget=False, poll=0.5)
    envelope = job.record
    weights, published = store.released(job.id)
    assert published == envelope
    public = keys.load_public_key(keys.public_key_path(site))
    record = training_record.verify(envelope, public, weights)
    assert record["epsilon"] == pytest.approx(1.0, rel=0.03) and record["delta"] == pytest.approx(1e-6)
    assert record["n_train"] + record["n_holdout"] == 569 and len(record["features"]) == 30
    (step,) = record["preprocessing"]
    assert step == {**step, "op": "standardise", "columns": columns, "from": "catalogue"}
    # the catalogue's, to the four significant digits it keeps (the published version's exact ones, rounded)
    rounded = standardise(site)[0]
    assert step["mean"] == rounded["mean"] and step["std"] == rounded["std"]
    assert {"test_accuracy", "mia_loss", "mia_calibrated"} <= set(record["metrics"])
    # well above a coin (0.63 for the larger class): the runner draws the seed, and at epsilon 1 the
    # default settings give 0.89 to 0.97 on the held-out rows
    assert record["metrics"]["test_accuracy"] >= 0.85
    assert record["finished"].endswith(":00Z")  # to the minute: when it ran is the kernel's choice
    tensors = load_weights(weights)
    assert set(tensors) == {"0.weight", "0.bias"}
    assert not any(torch.isclose(t, torch.tensor(MARK), atol=1.0).any() for t in tensors.values())
    (run,) = [r for r in ledger.runs("oncology") if r["run_id"] == f"job:{job.id}"]
    assert run["state"] == "settled" and run["epsilon_spent"] == pytest.approx(record["epsilon"])
    assert run["weights_sha256"] == record["weights_sha256"] and run["username"] == "alice"
    # the audit trail says where and how it trained: this machine has no GPU
    entries = [
        json.loads(line)
        for f in (site.state_dir / "audit").glob("*.jsonl")
        for line in f.read_text().splitlines()
        if '"jobs.run"' in line and job.id in line
    ]
    (done,) = [e for e in entries if e["details"].get("state") == "done"]
    assert done["details"]["device"] == "cpu" and done["details"]["clipping"] in ("fast", "exact")
    assert done["details"]["graph"] is False  # a CUDA graph only on a GPU


class MarginModel(nn.Module):
    """A linear classifier of one output whose bias is added at half scale (``add``'s ``alpha``)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(10, 1, bias=False)
        self.bias = nn.Parameter(torch.full((1,), MARK))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(self.linear(x), self.bias, alpha=0.5)


def test_a_margin_classifier_trains_from_zeros_with_momentum_and_its_record_says_so(world):
    """The example of docs/jobs.md's utility section, through the sandboxed worker: ten named columns, the
    smooth hinge loss, sgd with momentum, full batches, parameters from zeros (the record states the scheme;
    the notebook's values never reach it)."""
    site, store, _, _ = world
    worst = [c for c in standardise(site)[0]["columns"] if c.startswith("worst ")]
    assert len(worst) == 10
    job = submit(
        MarginModel(),
        **request(
            features=worst, preprocessing=[{"op": "standardise", "columns": worst}], loss="smooth_hinge",
            momentum=0.5, init="zeros", lr=1.0, max_grad_norm=0.5, epochs=25, batch_size=455,
        ),
    )  # fmt: skip
    job.wait(timeout=300, widget=False, poll=0.5)
    weights, _ = store.released(job.id)
    record = training_record.verify(job.record, keys.load_public_key(keys.public_key_path(site)), weights)
    assert record["initialisation"]["scheme"] == "zeros" and record["features"] == worst
    assert record["epsilon"] == pytest.approx(1.0, rel=0.03)
    # 0.95 to 0.98 on the demo's held-out rows at epsilon 1 (the benchmark compares it with scikit-learn's)
    assert record["metrics"]["test_accuracy"] >= 0.9
    assert set(load_weights(weights)) == {"linear.weight", "bias"}


def test_a_job_over_the_budget_fails_with_the_ledgers_reason(world):
    site, store, ledger, gate = world
    ledger.set_budget("oncology", "breast_cancer", 0.5, 1e-5, by="sam")
    job = submit(model(), **request(target_epsilon=1.0))
    with pytest.raises(JobFailed, match="budget"):
        job.wait(timeout=120, widget=False, poll=0.3)
    assert job.state == "failed"


def test_a_cancelled_job_stops_and_its_reservation_counts_in_full(world):
    site, store, ledger, gate = world
    job = submit(model(), **request(epochs=1000, target_epsilon=5.0))
    deadline = 120
    import time

    start = time.monotonic()
    while not job.progress.get("step") and time.monotonic() - start < deadline:
        time.sleep(0.2)
    job.cancel()
    with pytest.raises(JobFailed, match="cancelled"):
        job.wait(timeout=60, widget=False, poll=0.3)
    (run,) = [r for r in ledger.runs("oncology") if r["run_id"] == f"job:{job.id}"]
    assert run["state"] == "settled" and run["epsilon_spent"] == pytest.approx(5.0)


def test_a_graph_the_runner_refuses_is_never_queued(world):
    bn = nn.Sequential(nn.Linear(30, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    with pytest.raises(Exception, match=r"has a buffer \('1.running_mean'\).*use LayerNorm or GroupNorm") as e:
        submit(bn, **request())
    assert getattr(e.value, "code", "") == "graph_refused"
    assert JobsClient().list() == []
    # A graph of whole-number rows (an embedding's indices) loads, but the runner gives float32 features.
    from paitient.kernel.jobs.export import export_graph

    indexed = nn.Sequential(nn.Embedding(50, 4), nn.Flatten(), nn.Linear(4 * 30, 2))
    program = export_graph(indexed, torch.zeros(2, 30, dtype=torch.long))
    with pytest.raises(
        Exception, match="it takes torch.int64 rows, and the runner gives it the features as float32"
    ) as e:
        wire = {**request(), "loss": "cross_entropy", "optimizer": "sgd", "holdout": 0.2, "preprocessing": []}
        JobsClient().submit(program, wire)
    assert getattr(e.value, "code", "") == "graph_refused"
    assert JobsClient().list() == []


def test_certified_weights_pass_the_airlock_on_the_runners_word_alone(world):
    from paitient import airlock as kernel_airlock

    site, store, ledger, gate = world
    job = submit(model(), **request(preprocessing=standardise(site)))
    job.wait(timeout=300, widget=False, poll=0.5)
    rid = kernel_airlock.request(job, justification="logistic regression trained by the runner at epsilon 1")
    gate.wait_idle()
    req = gate.store.get(rid)
    assert req.kind == "weights" and req.meta["job"] == job.id
    checks = {c["check"]: c for c in gate.describe(req, for_steward=True)["checks"]}
    statuses = {k: c["status"] for k, c in checks.items()}
    audit = statuses.pop("membership_inference")
    assert statuses == {"published_copy": "pass", "format": "pass", "certified": "pass", "training_record": "pass"}
    # the runner draws the split: on 114 held-out rows a DP model's estimate may by chance reach the bound
    assert audit in ("pass", "review") and "mia_loss_low" in checks["membership_inference"]["details"], checks
    assert req.sha256 == job.record["record"]["weights_sha256"]

    # The steward's page lists what the runner signed, as the airlock verified it.
    signed = job.record["record"]
    facts = dict(views.certified_facts(list(checks.values())) or [])
    assert facts["Training job"] == job.id and facts["Epsilon spent (the runner's accountant)"] == str(
        signed["epsilon"]
    )
    assert facts["SHA-256 of the weights file"] == req.sha256 and facts["Rows trained on"] == str(signed["n_train"])
    assert facts["Signed with the runner's key"] == job.record["key_id"]
    # Certified weights need the project's own approvals (one), though the project refuses self-reported ones.
    assert site.project("oncology").self_reported_weights == "refuse" and gate.approvals_needed(req) == 1
    with pytest.raises(PermissionError, match="not released"):
        gate.download(rid, username="alice", scopes={SCOPE_DOWNLOAD}, part="record")
    gate.decide(rid, username="sam", scopes={SCOPE_REVIEW}, action="approve", comment="certified, audit in bounds")
    assert gate.store.get(rid).state == "released"
    _, weights = gate.download(rid, username="alice", scopes={SCOPE_DOWNLOAD})
    _, record = gate.download(rid, username="alice", scopes={SCOPE_DOWNLOAD}, part="record")
    offline = training_record.verify(json.loads(record), gate.jobs_public_key(), weights)
    assert offline == signed


def test_a_record_edited_or_weights_swapped_after_the_run_are_refused(world):

    from paitient import airlock as kernel_airlock
    from paitient.kernel.airlock.client import AirlockError

    site, store, ledger, gate = world
    job = submit(model(), **request(preprocessing=standardise(site), epochs=2))
    job.wait(timeout=300, widget=False, poll=0.5)
    out = store.out_dir(job.id)
    signed = (out / "record.json").read_text()
    edited = json.loads(signed)
    edited["record"]["epsilon"] = 0.01  # as if the run had spent almost nothing
    (out / "record.json").write_text(json.dumps(edited))
    with pytest.raises(AirlockError, match="changed after it was signed"):
        kernel_airlock.request(job, justification="edited record")
    (out / "record.json").write_text(signed)
    weights = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(weights[:-4] + b"\0\0\0\0")  # weights that are not the run's
    with pytest.raises(AirlockError, match="not the weights the runner trained"):
        kernel_airlock.request(job, justification="swapped weights")
    assert not [r for r in gate.store.list() if r.meta.get("job") == job.id]  # nothing was taken in


def test_kill_9_of_the_runner_mid_job_leaves_no_weights_and_counts_the_reservation_in_full(world_tmp, make_system_user):
    """The runner as its own process (as the hub runs it), killed with SIGKILL while a job trains."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from paitient.config import EMBEDDED_SITE

    account = make_system_user("jobs")
    state = world_tmp / "state"
    site_file = world_tmp / "site.toml"
    text = EMBEDDED_SITE.read_text().replace('state_dir = "/var/lib/paitient"', f'state_dir = "{state}"')
    site_file.write_text(text + f'\n[jobs]\naccount = "{account.pw_name}"\n')
    site = load(str(site_file))
    publish_demo(site)
    registry = Registry.for_state_dir(site.state_dir)
    rootmember.put(registry, Member("alice", "root", 0, ("oncology",), ("researcher",)))
    ledger = Ledger(site)
    service = LedgerService(site, ledger, registry, logging.getLogger("t"))
    server = ChannelServer(socket_path(site, "ledger"), service.handlers())
    server.start_in_thread()
    log = open(world_tmp / "jobs.log", "ab")  # noqa: SIM115 - the runner's output, read on failure

    def start_runner() -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "paitient.cli", "service", "jobs", f"--site={site_file}"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while not socket_path(site, "jobs").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (world_tmp / "jobs.log").read_text()[-2000:]
            time.sleep(0.1)
        return proc

    runner = start_runner()
    try:
        client = JobsClient(site.run_dir)
        from paitient.kernel.jobs.export import export_graph

        info = client.submit(export_graph(model(), torch.zeros(2, 30)), request(epochs=1000, target_epsilon=5.0))
        job = Job(info, client)
        deadline = time.monotonic() + 120
        while not job.progress.get("step"):
            assert time.monotonic() < deadline, (world_tmp / "jobs.log").read_text()[-2000:]
            time.sleep(0.2)
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait()
        socket_path(site, "jobs").unlink()
        service.sweep()  # what the ledger does every few seconds: the reserving process is gone
        (run,) = [r for r in ledger.runs("oncology") if r["run_id"] == f"job:{job.id}"]
        assert run["state"] == "lost"
        b = next(x for x in ledger.budget("oncology") if x["dataset"] == "breast_cancer")
        assert b["epsilon_spent"] + b["epsilon_reserved"] == pytest.approx(5.0)  # counted in full
        runner = start_runner()
        assert job.state == "failed" and "stopped while the job ran" in job.reason
        out = site.state_dir / "jobs" / "out" / job.id
        assert not out.exists() or not any(out.iterdir())  # no half-written weights or record
    finally:
        runner.send_signal(signal.SIGTERM)
        runner.wait(30)
        server.shutdown()
        server.server_close()
        log.close()


def test_weights_leave_without_a_steward_only_when_their_graph_was_approved_and_constants_are_the_catalogues(
    world,
):
    """A project that releases certified weights automatically, of the graphs its stewards approved: a job
    of another graph waits for a steward, who reads the graph (its numbers steer what training writes into
    the weights: tests/jobs/test_train.py); a job standardised with the researcher's own constants waits
    for a steward, who reads them (they leave with the signed record); one of an approved graph whose
    constants all came from the catalogue is not held back for either."""
    from paitient import airlock as kernel_airlock
    from paitient.rules import review

    site, store, ledger, gate = world
    columns = standardise(site)[0]["columns"]
    catalogue = [{"op": "standardise", "columns": columns}]
    own = submit(model(), **request(preprocessing=standardise(site), epochs=2))
    catalogued = submit(model(), **request(preprocessing=catalogue, epochs=2))
    other = submit(
        nn.Sequential(nn.Linear(30, 4), nn.ReLU(), nn.Linear(4, 2)), **request(preprocessing=catalogue, epochs=2)
    )
    for job in (own, catalogued, other):
        job.wait(timeout=300, widget=False, poll=0.5)
    approved = catalogued.record["record"]["graph_sha256"]
    assert own.record["record"]["graph_sha256"] == approved != other.record["record"]["graph_sha256"]
    oncology = site.project("oncology").replace(auto_release=("table", "weights"), auto_release_graphs=(approved,))
    gate.site = site.replace(projects=tuple(oncology if p.name == "oncology" else p for p in site.projects))
    reasons = {}
    for job in (own, catalogued, other):
        rid = kernel_airlock.request(job, justification="a logistic regression the runner trained")
        gate.wait_idle()
        moved = [e.data for e in gate.store.events(rid, "state") if e.data.get("to") == review.IN_REVIEW]
        reasons[job] = (gate.store.get(rid).state, moved[0].get("not_automatic", ""))
    assert reasons[own] == (
        review.IN_REVIEW,
        "the signed record carries preprocessing constants the researcher chose (not the catalogue's), which "
        "leave with the weights: a steward reads them",
    )
    assert reasons[other] == (
        review.IN_REVIEW,
        "the model's graph is not one the project's stewards approved for automatic release "
        "(auto_release_graphs): its numbers and structure steer what training writes into the weights, so a "
        "steward reads it",
    )
    # The steward's page reads the graph the runner trained from what the runner handed the airlock.
    req = next(r for r in gate.store.list(username="alice") if r.meta.get("job") == other.id)
    from paitient.services.airlock import views

    stored = gate.store.read_blob(req.meta["graph_listing"])
    listing = json.loads(stored)
    assert listing["lines"][:2] == ["p0 = parameter 0.weight [4, 30]", "p1 = parameter 0.bias [4]"]
    assert listing["numbers"] == []
    # The parameters' names are the researcher's text and stay in the weights file: the page lists them.
    assert views.graph_listing(stored).parameter_names == ("0.weight", "0.bias", "2.weight", "2.bias")
    # The catalogue's constants pass; only the membership audit may still leave it to a steward by chance.
    state, why = reasons[catalogued]
    assert state == review.RELEASED or why == "not every automatic check passed", (state, why)


async def test_stewards_approve_a_graph_on_its_page_and_later_jobs_of_it_leave_without_review(world):
    """Approving a graph for automatic release is a steward's act on the request's page, not an edit of the
    site file: it needs the project's two stewards here (approvals = 2), each having opened the page the graph
    is listed on and written why; a researcher, the requester and a steward who has not read the graph are
    refused. Once approved, a later job of the same graph is not held back for its graph; one revocation sends
    the next one to a steward again. Each step is in the audit trail."""
    from tornado.httpserver import HTTPServer
    from tornado.testing import bind_unused_port

    from paitient import airlock as kernel_airlock
    from paitient.rules import review
    from paitient.services.airlock.web import make_app
    from tests.airlock.helpers import Client, known_user_auth
    from tests.trail import trail_records

    site, store, ledger, gate = world
    columns = standardise(site)[0]["columns"]
    oncology = site.project("oncology").replace(auto_release=("weights",), stewards=("sam", "rita"), approvals=2)
    gate.site = site.replace(projects=tuple(oncology if p.name == "oncology" else p for p in site.projects))
    graph_reason = (
        "the model's graph is not one the project's stewards approved for automatic release (auto_release_graphs): "
        "its numbers and structure steer what training writes into the weights, so a steward reads it"
    )

    def run_and_request() -> tuple[str, str, str]:
        job = submit(model(), **request(preprocessing=[{"op": "standardise", "columns": columns}], epochs=2))
        job.wait(timeout=300, widget=False, poll=0.5)
        rid = kernel_airlock.request(job, justification="a logistic regression the runner trained")
        gate.wait_idle()
        moved = [e.data for e in gate.store.events(rid, "state") if e.data.get("to") == review.IN_REVIEW]
        return rid, gate.store.get(rid).state, moved[0].get("not_automatic", "")

    rid, state, why = run_and_request()
    assert (state, why) == (review.IN_REVIEW, graph_reason)
    sha = gate.certified_graph(gate.store.get(rid))
    assert sha is not None and gate.graph_standing(gate.store.get(rid)).approved is False

    server = HTTPServer(make_app(gate, hub_auth=known_user_auth()))
    sock, port = bind_unused_port()
    server.add_sockets([sock])
    web = Client(f"http://127.0.0.1:{port}")

    async def post(user: str, **form: str):
        """Post the graph form as ``user``, with a form token from a steward's page (tokens are not per user)."""
        page = await web.fetch("sam" if user == "alice" else user, f"requests/{rid}")
        token = re.search(r'name="_xsrf" value="([^"]+)"', page.body.decode())
        cookie = SimpleCookie(page.headers.get("Set-Cookie", ""))
        return await web.fetch(
            user,
            f"requests/{rid}/graph",
            method="POST",
            body={**form, "_xsrf": token.group(1)},
            cookies={"_xsrf": cookie["_xsrf"].value},
        )

    reason = "read the listing: one linear layer, no numbers, the catalogue's standardisation"
    try:
        # Nobody approves a graph unread: the approval covers every later job of it.
        with pytest.raises(review.TransitionError, match="open the request's page and read the graph first"):
            gate.decide_graph(rid, username="sam", scopes={SCOPE_REVIEW}, action="approve", reason=reason)
        mine = await web.fetch("alice", f"requests/{rid}")
        assert mine.code == 200 and b'id="graph-approval"' not in mine.body  # the requester's page: no graph
        refused = await post("alice", action="approve", reason=reason)
        assert refused.code == 403 and b"only the stewards of project oncology approve its graphs" in refused.body
        page = (await web.fetch("sam", f"requests/{rid}")).body.decode()
        assert 'id="graph-approve-form"' in page and "Not approved" in page
        short = await post("sam", action="approve", reason="fine")
        assert short.code == 400 and b"at least 20 characters" in short.body
        approved = await post("sam", action="approve", reason=reason)
        assert approved.code == 303
        assert (await post("sam", action="approve", reason=reason)).code == 409  # once each
        page = (await web.fetch("sam", f"requests/{rid}")).body.decode()
        assert "Not approved" in page and "Approved here by sam" in page and "2 stewards must approve it" in page
        assert not gate.graph_standing(gate.store.get(rid)).approved  # one of two
        assert (await post("rita", action="approve", reason=reason + ", checked again")).code == 303
        page = (await web.fetch("rita", f"requests/{rid}")).body.decode()
        assert "Approved: certified weights of this graph" in page and 'id="graph-revoke-form"' in page
        standing = gate.graph_standing(gate.store.get(rid))
        assert standing.approved and [a.actor for a in standing.approvals] == ["sam", "rita"]
        assert gate.store.get(rid).state == review.IN_REVIEW  # approving the graph decides no request

        rid2, state, why = run_and_request()
        assert why != graph_reason and (state == review.RELEASED or why == "not every automatic check passed")

        rid = rid2  # revoked from the next request's page: one steward is enough
        assert (await post("rita", action="revoke", reason="a second look")).code == 303
        assert not gate.graph_standing(gate.store.get(rid)).approved
        _, state, why = run_and_request()
        assert (state, why) == (review.IN_REVIEW, graph_reason)
    finally:
        server.stop()
        await server.close_all_connections()
    records = [(r["actor"], r["outcome"], r["details"]["action"]) for r in trail_records(site, action="airlock.graph")]
    assert records == [
        ("sam", "denied", "approve"),
        ("alice", "denied", "approve"),
        ("sam", "denied", "approve"),
        ("sam", "ok", "approve"),
        ("sam", "denied", "approve"),
        ("rita", "ok", "approve"),
        ("rita", "ok", "revoke"),
    ]
    ok = [r for r in trail_records(site, action="airlock.graph") if r["outcome"] == "ok"]
    assert {r["details"]["graph_sha256"] for r in ok} == {sha} and ok[0]["details"]["reason"] == reason


def test_a_graph_whose_sequence_gradients_cancel_moves_the_weights_by_one_row_at_most(world, monkeypatch):
    """The graph feeds each row twice through one Linear and cancels the two steps' backprops by a raw feature
    squared: a norm computed without the row's gradient came out zero for rows whose gradient was over a
    thousand times the bound, and replacing one row moved the trained weights 600 times further than DP-SGD
    allows. Two jobs through the runner on neighbouring rows (one training row replaced by another), with the
    runner's seeds fixed so that only that row differs: their weights are as close as the bound says."""
    from dataclasses import replace

    from paitient.services.jobs import runner as runner_module
    from tests.jobs.test_persample import Cancelling

    site, store, ledger, gate = world
    monkeypatch.setattr(runner_module, "_seed", lambda: 20261206)  # the same split, start, sampling and noise
    prepare = runner_module.prepare
    neighbour = {"on": False, "row": -1}

    def prepared(*args, **kwargs):
        p = prepare(*args, **kwargs)
        if not neighbour["on"]:
            return p
        x, y = p.x_train.copy(), p.y_train.copy()
        row = neighbour["row"] = int(x[:, 23].argmax())  # the largest s: where the two steps cancel most
        x[row], y[row] = x[0], y[0]
        return replace(p, x_train=x, y_train=y)

    monkeypatch.setattr(runner_module, "prepare", prepared)
    torch.manual_seed(0)
    spec = request(epochs=5, batch_size=455, lr=0.1, target_epsilon=1.0)  # every row, 5 steps; raw features
    weights = []
    for on in (False, True):
        neighbour["on"] = on
        job = submit(Cancelling(), **spec)
        job.wait(timeout=300, widget=False, poll=0.5)
        record = job.record["record"]
        assert record["epsilon"] == pytest.approx(1.0, rel=0.03) and record["n_train"] == 455
        weights.append(load_weights(store.released(job.id)[0]))
    assert neighbour["row"] > 0
    moved = float(torch.sqrt(sum((weights[0][k] - weights[1][k]).double().square().sum() for k in weights[0])))
    # each of the 5 steps (sampling rate 1) moves the weights by lr / 455 times the two rows' clipped
    # gradients, at most 2 C between them
    assert moved <= 2 * 5 * 0.1 * 1.0 / 455, moved


def test_a_job_that_cannot_run_says_why_quoting_no_row_and_reserves_nothing(world):
    """A text target for mse made pandas' error quote a row's pseudonym ("could not convert string to float:
    'P-...'") into the job's reason and its jobs.run record; a model with fewer outputs than the target's
    classes failed in the sandbox with torch's "Target 172 is out of bounds", after its budget was reserved
    (a failed job's reservation counts in full). Each is refused before any budget is reserved, by the
    runner's own words, and no reason quotes a value of the rows."""
    import pyarrow.parquet as pq

    site, store, ledger, gate = world
    frame = pq.read_table(site.data_root / "oncology" / "breast_cancer" / "current" / "data.parquet").to_pandas()
    pseudonyms = {str(v) for v in frame["patient"]}
    cases = [
        (nn.Linear(30, 1), {"target": "patient", "loss": "mse"}, "the target 'patient' holds text, not numbers"),
        (nn.Linear(30, 2), {"target": "mean radius"}, "the target has more classes than the model's 2 outputs"),
        (nn.Linear(29, 2), {}, "the model takes rows of shape (29,), and the job has 30 features"),
        (nn.Linear(30, 2), {"loss": "bce_with_logits"}, "bce_with_logits needs one output per row"),
    ]
    ids = []
    for net, change, message in cases:
        job = submit(nn.Sequential(net), **request(**change))
        with pytest.raises(JobFailed, match=re.escape(message)) as failed:
            job.wait(timeout=120, widget=False, poll=0.3)
        assert not any(p in str(failed.value) for p in pseudonyms)
        ids.append(job.id)
    assert not [r for r in ledger.runs("oncology") if r["run_id"] in {f"job:{i}" for i in ids}]  # nothing reserved
    reasons = [
        json.loads(line)["details"]["reason"]
        for f in (site.state_dir / "audit").glob("*.jsonl")
        for line in f.read_text().splitlines()
        if '"jobs.run"' in line and any(i in line for i in ids) and '"failed"' in line
    ]
    assert len(reasons) == len(cases) and not any(p in r for r in reasons for p in pseudonyms)


def test_the_sandboxs_error_output_stays_in_the_operators_log(tmp_path, caplog):
    """The worker's stderr ends with the exception's message, which can quote a value of its rows; the reason
    names the exception's type only, the runner's log (root's) keeps the rest."""
    import os
    import sys

    from paitient.services.jobs.execute import ExecutionFailed, _supervise

    script = "import sys; sys.stderr.write('noise\\n'); raise IndexError('Target 172 is out of bounds.')"
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        with caplog.at_level(logging.WARNING, logger="paitient.services.jobs"):
            with pytest.raises(ExecutionFailed) as failed:
                _supervise([sys.executable, "-c", script], fd, 60, lambda line: True)
    finally:
        os.close(fd)
    assert (
        str(failed.value)
        == "the training sandbox exited with status 1 (IndexError); the operator's log has the details"
    )
    assert "Target 172 is out of bounds" in caplog.text


def test_a_request_beyond_what_the_runner_plans_is_refused_at_submission_and_reserves_nothing(world):
    """The red team's request (epsilon 100, 20 epochs of one row in 455: 9,100 steps) made the root runner's
    planning exhaust the host's memory before any budget was reserved. It is refused at submit, saying what to ask
    for; nothing is queued or reserved. A request within the bound is taken."""
    site, store, ledger, gate = world
    net = nn.Sequential(nn.Linear(30, 2))
    asked = dict(loss="cross_entropy", epochs=20, batch_size=1, max_grad_norm=1.0, target_epsilon=100.0)
    with pytest.raises(Exception, match=r"target_epsilon 100 over 9100 steps .* the privacy accountant can plan") as e:
        submit(net, **request(**asked))
    assert getattr(e.value, "code", "") == "bad_request"
    assert "ask for fewer epochs or a larger batch_size" in str(e.value)
    with pytest.raises(Exception, match=r"1000 epochs of batch_size 1 on 455 training rows is 455000 steps") as e:
        submit(net, **request(**{**asked, "epochs": 1000, "target_epsilon": 0.001}))
    assert getattr(e.value, "code", "") == "bad_request"
    assert JobsClient().list() == []
    assert not [r for r in ledger.runs("oncology") if r["run_id"].startswith("job:")]


def test_a_graph_sent_as_a_pipe_is_refused_at_once_and_the_accounts_next_call_works(world):
    """The graph's descriptor was read to its end with no check: a pipe whose write end the caller kept open
    held the connection's thread for ever, and nine such calls gave too_many_connections to every jobs
    operation of the account. Only a regular file is read; anything else is refused at once."""
    import os
    import time

    from paitient.kernel.jobs.export import export_graph
    from paitient.services.jobs.service import NOT_A_FILE

    wire = {**request(), "loss": "cross_entropy", "optimizer": "sgd", "holdout": 0.2, "preprocessing": []}
    held = []
    try:
        for _ in range(12):
            r, w = os.pipe()
            held.append(w)
            os.write(w, export_graph(model(), torch.zeros(2, 30))[:1000])
            start = time.monotonic()
            with pytest.raises(Exception, match=re.escape(NOT_A_FILE)) as e:
                JobsClient(timeout=10).call("submit", wire, fds=[r])
            assert getattr(e.value, "code", "") == "bad_request" and time.monotonic() - start < 5
            os.close(r)
        assert JobsClient(timeout=10).list() == []  # the account's connections are all free
    finally:
        for w in held:
            os.close(w)


KEEP_INIT_ALIVE = """
import os, sys
print('{"step": 1, "steps": 9, "epsilon": 0.1, "loss": 1.0}', flush=True)
# bubblewrap's init (pid 1 here) runs as this account, its memory writable through /proc: its code where it waits
# for its child becomes prctl(PR_SET_PDEATHSIG, 0); for (;;) pause(); (x86-64)
nr, *rest = open("/proc/1/syscall").read().split()
with open("/proc/1/mem", "r+b", buffering=0) as mem:
    mem.seek(int(rest[-1], 16))
    mem.write(bytes.fromhex("bf0100000031f6b89d0000000f05b8220000000f05ebf7"))
os._exit(0)
"""
FLOOD = """
import os
os.write(1, b'{"step": 1, "loss": "')
for _ in range(1024):
    os.write(1, b"x" * (1 << 20))
os.write(1, b'"}\\n')
for _ in range(1024):
    os.write(2, b"e" * (1 << 20))
raise SystemExit(3)
"""


def _run_in_the_worker_sandbox(monkeypatch, world_tmp, account, code, timeout):
    """``code`` run in the worker's real sandbox (``run_worker``: the account, limits, seccomp, bubblewrap), in
    place of the worker, as a worker whose graph took it over would run."""
    import numpy as np

    from paitient.services.jobs import execute

    real = execute.sandbox_argv

    def argv(**kw):
        full = real(**kw)
        assert full[-3:-1] == ["-m", "paitient.services.jobs.worker"]
        return [*full[:-3], "-c", code, full[-1]]

    monkeypatch.setattr(execute, "sandbox_argv", argv)
    arrays = {
        "x_train": np.zeros((4, 2), np.float32),
        "y_train": np.zeros(4, np.int64),
        "x_holdout": np.zeros((2, 2), np.float32),
        "y_holdout": np.zeros(2, np.int64),
    }
    seen: list[dict] = []
    with pytest.raises(execute.ExecutionFailed) as failed:
        execute.run_worker(
            program=b"{}", arrays=arrays, plan={"device": "cpu"}, account=account.pw_name, timeout=timeout,
            memory_mb=2048, on_progress=lambda line: seen.append(line) or True, work_root=world_tmp / "work",
            state_dir=world_tmp,
        )  # fmt: skip
    return str(failed.value), seen


def test_a_worker_that_keeps_its_sandboxs_init_alive_ends_at_its_timeout_and_leaves_nothing(
    monkeypatch, world_tmp, make_system_user
):
    """Attack (a worker its graph took over): the sandbox's init, of the runner's account, rewritten to live on
    without its parent. It held the worker's output pipe open: the runner read on past the job's timeout
    (25 s past 5 s, until the process was killed by hand), its queue stalled, and the sandbox lived on. The
    runner now kills that init at the end of the run, and with it everything in the sandbox."""
    import platform
    import threading
    import time

    from tests.processes import processes_of

    assert platform.machine() == "x86_64", "the attack's machine code is x86-64's; write it for this machine"
    account = make_system_user("jobs")
    got: dict = {}
    t = threading.Thread(
        target=lambda: got.update(
            out=_run_in_the_worker_sandbox(monkeypatch, world_tmp, account, KEEP_INIT_ALIVE, timeout=5)
        ),
        daemon=True,
    )
    started = time.monotonic()
    t.start()
    t.join(60)
    assert not t.is_alive(), "the runner is still reading the worker's output"
    assert time.monotonic() - started < 20
    reason, seen = got["out"]
    assert reason == "the job did not finish within 5 s" and seen[0]["step"] == 1
    deadline = time.monotonic() + 5
    while processes_of(account.pw_uid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_of(account.pw_uid) == []


def test_what_a_worker_writes_is_read_to_a_bound(monkeypatch, world_tmp, make_system_user):
    """Attack (a worker its graph took over): a 1 GiB progress line and 1 GiB on stderr. The runner read the
    line whole and kept all of stderr (2 GiB written took it to 4.2 GiB). Now each line is cut at MAX_LINE
    and a tail of stderr is kept: the runner's peak memory grows by less than 200 MiB."""

    from tests.processes import peak_memory, reset_peak_memory

    before = reset_peak_memory()
    reason, seen = _run_in_the_worker_sandbox(monkeypatch, world_tmp, make_system_user("jobs"), FLOOD, timeout=120)
    assert reason.startswith("the training sandbox exited with status 3") and seen == []
    assert peak_memory() - before < 200 * 1024


OOM_SCORE = """
import json
oom, lowered = oom_probe()
print(json.dumps({"step": 1, "steps": 9, "oom": oom, "lowered": lowered}), flush=True)
raise SystemExit(3)
"""


def test_a_workers_sandbox_is_the_oom_killers_first_choice(monkeypatch, world_tmp, make_system_user):
    """A worker's sandbox ran at oom_score_adj 0, beside the services: under memory pressure the OOM killer could
    end a service before a job. It now starts at 1000, as kernels do, with a floor the worker cannot lower
    where the runner holds CAP_SYS_RESOURCE (root in a container does not: there the worker can lower it)."""
    import errno

    from paitient.services.launcher.service import has_sys_resource
    from tests.processes import OOM_PROBE

    code = OOM_PROBE + OOM_SCORE
    reason, seen = _run_in_the_worker_sandbox(monkeypatch, world_tmp, make_system_user("jobs"), code, timeout=60)
    assert reason.startswith("the training sandbox exited with status 3")
    assert [line["oom"] for line in seen] == [1000]
    assert seen[0]["lowered"] == (errno.EACCES if has_sys_resource() else 0)
