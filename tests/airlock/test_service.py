"""The airlock service over its real unix socket, with requests from real processes of other accounts."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save

from paitient.rules import review
from paitient.services.airlock.service import Airlock, AirlockSettings
from paitient.services.audit import trail_dir
from paitient.services.audit.query import newest_first
from paitient.services.ledger.store import Ledger
from tests.airlock.helpers import breast_cancer, csv_bytes, give, publish, register, run_as, wait_state

LINEAR = """
import torch
class Model(torch.nn.Module):
    def __init__(self, d=30):
        super().__init__()
        self.lin = torch.nn.Linear(d, 2)
    def forward(self, x):
        return self.lin(x)
"""


def submit(user, site, path, kind, justification="for the paper", **extra):
    code = f"""
        import json
        from paitient import airlock
        try:
            print(json.dumps({{"id": airlock.request({str(path)!r}, kind={kind!r}, confirm=True,
                                justification={justification!r}, **{extra!r})}}))
        except airlock.AirlockError as e:
            print(json.dumps({{"error": str(e)}}))
    """
    proc = run_as(user.pw_uid, code, site.run_dir, cwd=path.parent)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def status_as(user, site, rid=None):
    code = f"""
        import json
        from paitient import airlock
        try:
            print(json.dumps(airlock.status({rid!r})))
        except airlock.AirlockError as e:
            print(json.dumps({{"error": str(e)}}))
    """
    proc = run_as(user.pw_uid, code, site.run_dir)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def audit_records(site, action):
    return [r for r in newest_first(trail_dir(site)) if r["action"] == action]


@pytest.fixture
def alice(make_system_user, registry):
    pw = make_system_user("alice")
    register(registry, "alice", pw.pw_uid, projects=["oncology"])
    return pw


@pytest.fixture
def bob(make_system_user, registry):
    pw = make_system_user("bob")
    register(registry, "bob", pw.pw_uid, projects=["cardio"])
    return pw


def test_table_with_small_cell_is_flagged(site, channel, airlock, alice):
    table = pd.DataFrame({"stage": ["I", "II", "III"], "patients": [120, 48, 3]})
    path = give(Path(alice.pw_dir) / "stages.csv", csv_bytes(table), alice.pw_uid)
    answer = submit(alice, site, path, "table")
    rid = answer["id"]
    wait_state(airlock, rid, review.IN_REVIEW)
    mine = status_as(alice, site, rid)
    assert mine["state"] == "in_review" and mine["username"] == "alice" and mine["project"] == "oncology"
    by_check = {c["check"]: c for c in mine["checks"]}
    assert by_check["minimum_count"]["status"] == "fail"
    assert "1 cell(s) count fewer than 10" in by_check["minimum_count"]["reason"]
    assert mine["overall"] == "fail"
    # The requester sees which cells, to fix them.
    assert by_check["minimum_count"]["details"]["cells"] == [{"row": 2, "column": "patients", "value": 3.0}]
    # The stored copy is the file's bytes, root-only and read-only.
    blob = airlock.store.blob_path(mine["sha256"])
    assert blob.read_bytes() == path.read_bytes()
    assert oct(blob.stat().st_mode & 0o777) == "0o400" and blob.stat().st_uid == 0
    assert mine["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # ... and the trail says who asked and what the checks found.
    req = audit_records(site, "airlock.request")[0]
    assert req["actor"] == "alice" and req["object"] == rid
    assert audit_records(site, "airlock.check")[0]["details"]["overall"] == "fail"


def test_the_service_reads_what_the_caller_opened_not_a_path(site, channel, airlock, alice, bob):
    # bob's private file: alice names its path, but her kernel cannot open it, so nothing is sent.
    secret = give(Path(bob.pw_dir) / "secret.csv", b"a,b\n1,2\n", bob.pw_uid)
    answer = submit(alice, site, secret, "table")
    assert "cannot open" in answer["error"] and "Permission denied" in answer["error"]
    assert airlock.store.list() == []


def test_pickle_is_refused_by_content(site, channel, airlock, alice):
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buf)
    for name in ("model.pt", "model.safetensors"):  # the name does not matter, the content does
        path = give(Path(alice.pw_dir) / name, buf.getvalue(), alice.pw_uid)
        answer = submit(alice, site, path, "weights")
        assert "zip archive" in answer["error"] and "refused" in answer["error"]
        assert "safetensors.torch.save_file" in answer["error"]
    plain = give(Path(alice.pw_dir) / "weights.bin", pickle.dumps({"w": [1.0]}), alice.pw_uid)
    assert "a pickle (protocol" in submit(alice, site, plain, "weights")["error"]
    assert airlock.store.list() == []
    denied = audit_records(site, "airlock.request")
    assert len(denied) == 3 and {r["outcome"] for r in denied} == {"denied"}


def _weights(seed: int = 0) -> tuple[bytes, torch.nn.Module]:
    ns: dict = {}
    exec(LINEAR, ns)  # noqa: S102 - the test's own model definition
    torch.manual_seed(seed)
    model = ns["Model"]()
    return save(model.state_dict()), model


def test_weights_without_a_dp_record_are_flagged(site, channel, airlock, alice):
    publish(site, "oncology", "breast_cancer", breast_cancer())
    data, _ = _weights()
    path = give(Path(alice.pw_dir) / "model.safetensors", data, alice.pw_uid)
    answer = submit(
        alice,
        site,
        path,
        "weights",
        model_source=LINEAR,
        target="target",
        split={"holdout": 0.3, "seed": 0},
        dataset="breast_cancer",
    )
    rid = answer["id"]
    wait_state(airlock, rid, review.IN_REVIEW)
    checks = {c["check"]: c for c in status_as(alice, site, rid)["checks"]}
    assert checks["format"]["status"] == "pass"
    assert checks["training_record"]["status"] == "fail"
    assert "no training record in the privacy ledger" in checks["training_record"]["reason"]
    # An untrained linear model does not memorise: the audit itself ran in the sandbox and passed.
    assert checks["membership_inference"]["status"] == "pass"


def test_weights_matching_a_dp_record_within_budget_pass(site, channel, airlock, alice):
    publish(site, "oncology", "breast_cancer", breast_cancer())
    data, model = _weights(1)
    sha = hashlib.sha256(data).hexdigest()
    # The file the researcher exports carries metadata: it still matches the canonical hash of the run.
    data = save(model.state_dict(), metadata={"exported_by": "alice"})
    assert hashlib.sha256(data).hexdigest() != sha
    ledger = Ledger(site)
    run = ledger.reserve("oncology", "breast_cancer", 2.0, 1e-5, user="alice")
    ledger.settle(
        run,
        1.5,
        record={
            "dataset": "breast_cancer",
            "dataset_version": 1,
            "epsilon": 1.5,
            "delta": 1e-5,
            "weights_sha256": sha,
            "mode": "ghost",
        },
    )
    path = give(Path(alice.pw_dir) / "model.safetensors", data, alice.pw_uid)
    rid = submit(alice, site, path, "weights", model_source=LINEAR, target="target", split={"holdout": 0.3, "seed": 0})[
        "id"
    ]
    wait_state(airlock, rid, review.IN_REVIEW)
    full = airlock.describe(airlock.store.get(rid), for_steward=True)
    checks = {c["check"]: c for c in full["checks"]}
    assert checks["training_record"]["status"] == "pass", checks["training_record"]
    assert "epsilon=1.5" in checks["training_record"]["reason"]
    assert checks["training_record"]["details"]["record"]["record.mode"] == "ghost"
    mi = checks["membership_inference"]["details"]
    assert mi["members"] == 398 and mi["nonmembers"] == 171  # 569 rows, 30% held out


def test_a_record_of_another_project_does_not_count(site, channel, airlock, alice, registry):
    data, _ = _weights(2)
    ledger = Ledger(site)
    run = ledger.reserve("cardio", "diabetes", 1.0, 1e-5, user="carol")
    ledger.settle(run, 1.0, record={"dataset": "diabetes", "weights_sha256": hashlib.sha256(data).hexdigest()})
    path = give(Path(alice.pw_dir) / "m.safetensors", data, alice.pw_uid)
    rid = submit(alice, site, path, "weights")["id"]
    wait_state(airlock, rid, review.IN_REVIEW)
    checks = {c["check"]: c for c in airlock.store.checks(rid)}
    assert "belongs to project 'cardio', not 'oncology'" in checks["training_record"]["reason"]
    assert checks["membership_inference"]["status"] == "fail"
    assert "no model definition came with the weights" in checks["membership_inference"]["reason"]


def test_a_target_the_client_would_refuse_fails_the_audit_with_what_to_name(site, channel, airlock, alice):
    # The kernel is untrusted: it can skip the client's checks and send any JSON as the model description.
    publish(site, "oncology", "breast_cancer", breast_cancer())
    data, _ = _weights()
    path = give(Path(alice.pw_dir) / "model.safetensors", data, alice.pw_uid)
    model = {"source": LINEAR, "target": ["target"], "dataset": "breast_cancer", "split": {"holdout": 0.3, "seed": 0}}
    args = {"kind": "weights", "justification": "for the paper", "filename": path.name, "model": model}
    code = f"""
        import json
        from paitient.kernel.airlock.client import AirlockClient
        with open({str(path)!r}, "rb") as f:
            print(json.dumps(AirlockClient().submit({args!r}, f.fileno())))
    """
    proc = run_as(alice.pw_uid, code, site.run_dir, cwd=path.parent)
    assert proc.returncode == 0, proc.stderr
    rid = json.loads(proc.stdout.strip().splitlines()[-1])["id"]
    wait_state(airlock, rid, review.IN_REVIEW)
    checks = {c["check"]: c for c in status_as(alice, site, rid)["checks"]}
    assert "internal" not in checks
    assert checks["membership_inference"]["status"] == "fail"
    assert checks["membership_inference"]["reason"] == (
        "the audit cannot run: \"the dataset has no target column ['target']; name it with target=\""
    )


def test_identity_comes_from_peer_credentials(site, channel, airlock, alice, bob):
    path = give(Path(alice.pw_dir) / "t.csv", b"x,n\na,50\n", alice.pw_uid)
    rid = submit(alice, site, path, "table")["id"]
    # bob cannot read alice's request, nor act for her project.
    assert "is not yours" in status_as(bob, site, rid)["error"]
    assert status_as(bob, site) == []
    bpath = give(Path(bob.pw_dir) / "t.csv", b"x,n\na,50\n", bob.pw_uid)
    err = submit(bob, site, bpath, "table", project="oncology")["error"]
    assert "not a member of project 'oncology'" in err and "cardio" in err
    # An account the hub never registered gets nothing.
    assert "is not a paitient account" in status_as(type("pw", (), {"pw_uid": 65534})(), site)["error"]


def test_bad_requests_say_what_to_do(site, channel, airlock, alice):
    path = give(Path(alice.pw_dir) / "t.csv", b"x,n\na,50\n", alice.pw_uid)
    assert "kind must be one of" in submit(alice, site, path, "report")["error"]
    assert "justification" in submit(alice, site, path, "table", justification="  ")["error"]
    assert "recipe (dict) goes with kind='table' only" in submit(alice, site, path, "figure", recipe={"a": 1})["error"]


def test_a_researcher_files_at_most_requests_per_day(site, alice, registry):
    """Over the socket, as alice's own process: with two requests a day, the third is refused before its file
    is read, says when the next can be filed, and is recorded as denied; nothing of it is stored."""
    from paitient.services.kit.channel import ChannelServer

    airlock = Airlock(site, settings=AirlockSettings(requests_per_day=2))
    airlock.start()
    srv = ChannelServer(site.run_dir / "airlock.sock", airlock.handlers(), name="airlock")
    srv.start_in_thread()
    try:
        path = give(Path(alice.pw_dir) / "t.csv", b"stage,patients\nI,120\nII,48\n", alice.pw_uid)
        ids = [submit(alice, site, path, "table")["id"] for _ in range(2)]
        blobs = sorted(p.name for p in airlock.store.blobs.rglob("*") if p.is_file())
        third = give(Path(alice.pw_dir) / "u.csv", b"stage,patients\nI,121\nII,49\n", alice.pw_uid)
        answer = submit(alice, site, third, "table")
        assert "you have filed 2 airlock requests in the last 24 hours" in answer["error"]
        assert "requests_per_day = 2" in answer["error"] and "the next can be filed from" in answer["error"]
        assert [r.id for r in airlock.store.list(username="alice")] == ids[::-1]
        assert sorted(p.name for p in airlock.store.blobs.rglob("*") if p.is_file()) == blobs
        denied = audit_records(site, "airlock.request")[0]
        assert (denied["actor"], denied["outcome"], denied["details"]["filed_in_24h"]) == ("alice", "denied", 2)
        assert denied["details"]["project"] == "oncology" and "requests_per_day" in denied["details"]["reason"]
    finally:
        srv.shutdown()
        srv.server_close()
        airlock.stop()


def test_a_table_longer_than_max_table_pages_is_refused_when_filed_and_by_a_check(site, alice, registry):
    """Over the socket, as alice's own process, with [airlock] max_table_pages = 2: a table of 401 rows fills
    three pages of 200, so no steward would open them all; its request is refused saying why and what to do,
    audited as denied, and nothing of it is stored. A check before the request says the same, and a table of
    400 rows (two pages) is filed."""
    from paitient.services.kit.channel import ChannelServer

    airlock = Airlock(site, settings=AirlockSettings(max_table_pages=2))
    airlock.start()
    srv = ChannelServer(site.run_dir / "airlock.sock", airlock.handlers(), name="airlock")
    srv.start_in_thread()
    try:
        rows = "".join(f"b{i},{1000 + 3 * i}\n" for i in range(401))
        long = give(Path(alice.pw_dir) / "long.csv", f"band,patients\n{rows}".encode(), alice.pw_uid)
        answer = submit(alice, site, long, "table")
        assert "the table has 401 rows and 2 columns, 3 preview pages of 200 rows by 30 columns" in answer["error"]
        assert "at most 2 ([airlock] max_table_pages): release an aggregate" in answer["error"]
        assert airlock.store.list(username="alice") == []
        assert not [p for p in airlock.store.blobs.rglob("*") if p.is_file()]
        denied = audit_records(site, "airlock.request")[0]
        assert (denied["actor"], denied["outcome"]) == ("alice", "denied")
        assert "max_table_pages" in denied["details"]["reason"]
        code = f"""
            import json
            from paitient import airlock
            print(json.dumps(airlock.check({str(long)!r}, kind="table").checks))
        """
        proc = run_as(alice.pw_uid, code, site.run_dir, cwd=long.parent)
        assert proc.returncode == 0, proc.stderr
        checked = {c["check"]: c for c in json.loads(proc.stdout.strip().splitlines()[-1])}
        assert checked["canonical"]["status"] == "fail"
        assert "3 preview pages" in checked["canonical"]["reason"]
        fits = give(
            Path(alice.pw_dir) / "fits.csv", f"band,patients\n{rows.rpartition('b400,')[0]}".encode(), alice.pw_uid
        )
        rid = submit(alice, site, fits, "table")["id"]
        assert airlock.store.get(rid).size > 0
    finally:
        srv.shutdown()
        srv.server_close()
        airlock.stop()


def test_restart_keeps_every_request_and_decision(site, alice, registry):
    from paitient.services.kit.channel import ChannelServer

    register(registry, "sam", 1, roles=("steward",))
    first = Airlock(site, settings=AirlockSettings())
    first.start()
    srv = ChannelServer(site.run_dir / "airlock.sock", first.handlers(), name="airlock")
    srv.start_in_thread()
    ids = []
    for i in range(3):
        path = give(Path(alice.pw_dir) / f"t{i}.csv", f"stage,patients\nI,{50 + i}\n".encode(), alice.pw_uid)
        ids.append(submit(alice, site, path, "table", justification=f"table {i}")["id"])
    first.wait_idle()
    first.decide(ids[0], username="sam", scopes={"custom:airlock:review"}, action="approve", comment="fine")
    first.decide(ids[1], username="sam", scopes={"custom:airlock:review"}, action="return", comment="round it")
    # A request caught mid-check by the stop is checked again after the restart.
    stuck = first.store.create(
        project="oncology",
        username="alice",
        account="pt-alice",
        uid=alice.pw_uid,
        kind="table",
        filename="s.csv",
        sha256=first.store.get(ids[2]).sha256,
        size=9,
        justification="stuck",
        meta={},
    )
    first.store.transition(stuck.id, review.CHECKING, actor="airlock")
    srv.shutdown()
    srv.server_close()
    first.stop()

    second = Airlock(site, settings=AirlockSettings())
    second.start()
    try:
        second.wait_idle()
        assert [second.store.get(i).state for i in ids] == ["released", "returned", "in_review"]
        decisions = second.store.events(ids[0], "decision")
        assert [(d.actor, d.data["action"], d.data["comment"]) for d in decisions] == [("sam", "approve", "fine")]
        assert second.store.events(ids[1], "decision")[0].data["comment"] == "round it"
        assert second.store.get(stuck.id).state == "in_review"
        assert [c["check"] for c in second.store.checks(stuck.id)] == [
            "published_copy",
            "row_level",
            "labels",
            "row_content",
            "minimum_count",
            "zeros",
            "dominance",
            "differencing",
        ]
        reruns = [e.data for e in second.store.events(stuck.id, "state") if e.data["to"] == "checking"]
        assert reruns[-1]["rerun"] is True
    finally:
        second.stop()


def test_row_level_data_does_not_leave(site, channel, airlock, alice):
    df = breast_cancer()
    where = publish(site, "oncology", "breast_cancer", df)
    # The published file itself, under another name ...
    copy = give(Path(alice.pw_dir) / "notes.bin", (where / "data.parquet").read_bytes(), alice.pw_uid)
    rid = submit(alice, site, copy, "table")["id"]
    # ... and as kind "other", which a steward would read whole: refused at the request, far too long for that.
    refused = submit(alice, site, copy, "other")["error"]
    assert "as kind 'other' (no automatic disclosure check) a steward reads it whole" in refused
    # ... and the rows re-exported as a "table", a few columns dropped and some rows sampled.
    export = df.drop(columns=df.columns[:5]).sample(frac=0.6, random_state=0)
    rows = give(Path(alice.pw_dir) / "cohort.csv", csv_bytes(export), alice.pw_uid)
    rid2 = submit(alice, site, rows, "table")["id"]
    wait_state(airlock, rid, review.IN_REVIEW)
    wait_state(airlock, rid2, review.IN_REVIEW)
    first = {c["check"]: c for c in airlock.store.checks(rid)}
    assert first["published_copy"]["status"] == "fail"
    assert "copy of the published dataset oncology/breast_cancer v1" in first["published_copy"]["reason"]
    second = {c["check"]: c for c in airlock.store.checks(rid2)}
    assert second["published_copy"]["status"] == "pass"
    assert second["row_level"]["status"] == "fail"
    assert "26 of the 31 columns of oncology/breast_cancer v1 and 341 of its 569 rows" in second["row_level"]["reason"]
