"""The ledger's storage on a real SQLite file: reservations, settlement, lost runs, overrides, lookups."""

import os
import stat

import pytest

from paitient.rules.budget import BudgetExceeded
from paitient.services.ledger.store import Ledger, LedgerError, db_path

SHA = "ab" * 32


def test_database_is_root_only(ledger, site):
    path = db_path(site)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.stat().st_uid == 0


def test_reserve_settle_releases_the_rest(ledger):
    row = ledger.reserve("oncology", "breast_cancer", 3.0, 1e-6, user="alice", run_id="r1", pid=os.getpid())
    b = {x["dataset"]: x for x in ledger.budget("oncology")}["breast_cancer"]
    assert (b["epsilon_reserved"], b["epsilon_spent"], b["epsilon_left"]) == (3.0, 0.0, 7.0)
    done = ledger.settle(row, 2.25, record={"weights_sha256": SHA, "steps": 40}, user="alice")
    assert done["state"] == "settled" and done["delta_spent"] == 1e-6
    b = {x["dataset"]: x for x in ledger.budget("oncology")}["breast_cancer"]
    assert (b["epsilon_reserved"], b["epsilon_spent"], b["epsilon_left"]) == (0.0, 2.25, 7.75)
    assert ledger.record_by_hash(SHA.upper())["record"] == {"weights_sha256": SHA, "steps": 40}
    assert ledger.record_by_hash("cd" * 32) is None


def test_refused_when_exhausted_with_numbers(ledger):
    ledger.reserve("oncology", "gbsg2", 1.5, 1e-7, user="alice")
    with pytest.raises(BudgetExceeded, match=r"epsilon 1 asked, but oncology/gbsg2 has 0.5 left of 2"):
        ledger.reserve("oncology", "gbsg2", 1.0, 1e-7, user="alice")
    # the other dataset has its own budget
    ledger.reserve("oncology", "breast_cancer", 1.0, 1e-7, user="alice")


def test_unknown_project_and_dataset_are_refused(ledger):
    with pytest.raises(LedgerError, match="no project 'nope'"):
        ledger.reserve("nope", "x", 1.0, 1e-7, user="a")
    with pytest.raises(LedgerError, match="has no dataset 'diabetes'; its datasets: breast_cancer, gbsg2"):
        ledger.reserve("oncology", "diabetes", 1.0, 1e-7, user="a")


def test_settle_rules(ledger):
    row = ledger.reserve("oncology", "breast_cancer", 1.0, 1e-6, user="alice")
    with pytest.raises(LedgerError, match="belongs to another user"):
        ledger.settle(row, 0.5, user="bob")
    with pytest.raises(LedgerError, match="more than the 1 reserved"):
        ledger.settle(row, 1.5, user="alice")
    with pytest.raises(LedgerError, match="unknown record field"):
        ledger.settle(row, 0.5, record={"secret": 1}, user="alice")
    zero = ledger.settle(row, 0.0, user="alice")
    assert (zero["epsilon_spent"], zero["delta_spent"]) == (0.0, 0.0)
    with pytest.raises(LedgerError, match="already settled"):
        ledger.settle(row, 0.5, user="alice")


def test_lost_run_counts_in_full(ledger):
    keep = ledger.reserve("cardio", "diabetes", 1.0, 1e-6, user="bob", pid=111, pid_start=5)
    dead = ledger.reserve("cardio", "diabetes", 2.0, 1e-6, user="bob", pid=222, pid_start=6)
    gone = ledger.mark_lost(lambda pid, start: pid == 111)
    assert gone == [dead]
    b = ledger.budget("cardio")[0]
    assert (b["epsilon_spent"], b["epsilon_reserved"], b["epsilon_left"]) == (2.0, 1.0, 2.0)
    with pytest.raises(LedgerError, match="already lost .*counts in full"):
        ledger.settle(dead, 0.1, user="bob")
    assert ledger.run(keep)["state"] == "reserved"


def test_steward_override_replaces_site_total(ledger, site):
    ledger.set_budget("cardio", "diabetes", 1.0, 1e-6, by="sam")
    b = ledger.budget("cardio")[0]
    assert (b["epsilon_total"], b["delta_total"], b["source"]) == (1.0, 1e-6, "steward")
    with pytest.raises(BudgetExceeded):
        ledger.reserve("cardio", "diabetes", 1.5, 1e-7, user="bob")
    # reopening keeps it; clearing returns to the site's total
    assert Ledger(site).total_for("cardio", "diabetes").epsilon == 1.0
    ledger.clear_budget("cardio", "diabetes")
    assert ledger.budget("cardio")[0]["epsilon_total"] == 5.0
    with pytest.raises(LedgerError, match="epsilon must be a positive number"):
        ledger.set_budget("cardio", "diabetes", -1, 1e-6, by="sam")
