"""The airlock asks the privacy ledger through its socket, as root: what the ledger says counts, and when it
is down the weights check says so instead of guessing."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save

from paitient.channel import ChannelError
from paitient.rules import review
from paitient.services.airlock.service import Airlock, AirlockSettings
from paitient.services.ledger.api import LedgerReader, UnknownDataset
from paitient.services.ledger.store import Ledger
from tests.airlock.helpers import submit, wait_state


def _weights(seed: int) -> bytes:
    torch.manual_seed(seed)
    return save(torch.nn.Linear(30, 2).state_dict())


def _settled_run(site, data: bytes, spent: float) -> str:
    ledger = Ledger(site)
    run = ledger.reserve("oncology", "breast_cancer", 3.0, 1e-6, user="alice")
    ledger.settle(run, spent, record={"dataset": "breast_cancer", "weights_sha256": hashlib.sha256(data).hexdigest()})
    return run


def _training_record(airlock: Airlock, rid: str) -> dict:
    wait_state(airlock, rid, review.IN_REVIEW)
    checks = {c["check"]: c for c in airlock.describe(airlock.store.get(rid), for_steward=True)["checks"]}
    return checks["training_record"]


def test_the_weights_check_takes_the_ledgers_answer(site, airlock, people):
    data = _weights(1)
    run = _settled_run(site, data, 2.5)
    rid = submit(airlock, people, "alice", data, kind="weights", name="m.safetensors")
    record = _training_record(airlock, rid)
    assert record["status"] == "pass", record
    assert record["details"]["record"]["id"] == run and "pid" not in record["details"]["record"]
    assert "(budget epsilon=5, delta=1e-05)" in record["reason"]  # oncology's total in the site configuration


def test_a_stewards_override_in_the_ledger_is_what_the_airlock_applies(site, airlock, people):
    data = _weights(2)
    _settled_run(site, data, 2.5)
    # The ledger's own total (a steward's override) is lower than the site configuration's 5: only the
    # ledger knows it, so an airlock that read the site or guessed would pass these weights.
    Ledger(site).set_budget("oncology", "breast_cancer", 2.0, 1e-5, by="sam")
    rid = submit(airlock, people, "alice", data, kind="weights", name="m.safetensors")
    record = _training_record(airlock, rid)
    assert record["status"] == "fail"
    assert "beyond the project's budget for breast_cancer (epsilon=2, delta=1e-05)" in record["reason"]


def test_a_ledger_that_is_down_gives_a_clear_reason_and_a_human_check(site, people):
    data = _weights(3)
    _settled_run(site, data, 1.0)  # the run exists, but nobody serves the ledger's socket
    airlock = Airlock(site, settings=AirlockSettings(audit_timeout=60))
    airlock.start()
    try:
        rid = submit(airlock, people, "alice", data, kind="weights", name="m.safetensors")
        record = _training_record(airlock, rid)
    finally:
        airlock.stop()
    assert record["status"] == "error"
    assert record["reason"].startswith("the privacy ledger could not be asked (the service at ")
    assert "ledger.sock is not running" in record["reason"]
    assert record["reason"].endswith("a steward checks the training record by hand")
    assert airlock.store.get(rid).state == review.IN_REVIEW  # never released on a guess


def test_root_reads_every_project_and_changes_nothing(site, ledger_service):
    reader = LedgerReader(site.run_dir)
    assert reader.total("cardio", "diabetes").epsilon == 10.0  # the site's default budget
    with pytest.raises(UnknownDataset, match="project 'oncology' has no dataset 'gbsg2'") as e:
        reader.total("oncology", "gbsg2")
    assert isinstance(e.value, KeyError) and e.value.code == "unknown_dataset"
    with pytest.raises(UnknownDataset, match="there is no project 'nowhere'"):
        reader.total("nowhere", "x")
    for op, args in (
        ("reserve", {"project": "cardio", "dataset": "diabetes", "epsilon": 1.0, "delta": 1e-6}),
        ("settle", {"reservation": "x", "epsilon_spent": 0.5}),
    ):
        with pytest.raises(ChannelError, match="root-side callers may read the ledger .* but change nothing") as e:
            reader.call(op, args)
        assert e.value.code == "forbidden"
    assert Ledger(site).runs() == []
