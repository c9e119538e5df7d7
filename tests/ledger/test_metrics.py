"""The ledger's metrics: per project and dataset what is spent, reserved and left, and runs by state, read
from the real ledger at each scrape."""

from __future__ import annotations

from paitient.services.ledger.metrics import ledger_registry
from paitient.services.ledger.store import Ledger
from tests.scrape import text, value


def test_budget_spent_and_reserved_move_with_reservations(site, ledger):
    registry = ledger_registry(site, ledger)
    onc = {"project": "oncology", "dataset": "breast_cancer"}
    assert value(registry, "paitient_ledger_epsilon_total", **onc) == 10.0
    assert value(registry, "paitient_ledger_epsilon_left", **onc) == 10.0
    assert value(registry, "paitient_ledger_runs", project="oncology", state="reserved") == 0

    first = ledger.reserve("oncology", "breast_cancer", 3.0, 1e-6, user="alice", pid=1)
    assert value(registry, "paitient_ledger_epsilon_reserved", **onc) == 3.0
    assert value(registry, "paitient_ledger_epsilon_left", **onc) == 7.0
    assert value(registry, "paitient_ledger_runs", project="oncology", state="reserved") == 1

    ledger.settle(first, 2.5, record={"mode": "fast"})
    assert value(registry, "paitient_ledger_epsilon_spent", **onc) == 2.5
    assert value(registry, "paitient_ledger_epsilon_reserved", **onc) == 0.0
    assert value(registry, "paitient_ledger_epsilon_left", **onc) == 7.5
    assert value(registry, "paitient_ledger_runs", project="oncology", state="reserved") == 0
    assert value(registry, "paitient_ledger_runs", project="oncology", state="settled") == 1

    # a reservation whose process is gone is lost and counts in full
    ledger.reserve("cardio", "diabetes", 1.0, 1e-7, user="bob", pid=1)
    ledger.mark_lost(lambda pid, start: False)
    cardio = {"project": "cardio", "dataset": "diabetes"}
    assert value(registry, "paitient_ledger_runs", project="cardio", state="lost") == 1
    assert value(registry, "paitient_ledger_epsilon_spent", **cardio) == 1.0
    # another project's numbers did not move
    assert value(registry, "paitient_ledger_epsilon_spent", project="oncology", dataset="gbsg2") == 0.0
    assert value(registry, "paitient_ledger_epsilon_total", project="oncology", dataset="gbsg2") == 2.0


def test_the_numbers_are_sums_over_researchers_and_name_none(site, ledger):
    for user in ("alice", "carol"):
        run = ledger.reserve("oncology", "breast_cancer", 1.0, 1e-7, user=user, pid=1)
        ledger.settle(run, 1.0, record={})
    registry = ledger_registry(site, ledger)
    assert value(registry, "paitient_ledger_epsilon_spent", project="oncology", dataset="breast_cancer") == 2.0
    assert "alice" not in text(registry) and "carol" not in text(registry)


def test_a_restarted_ledger_reports_the_same(site, ledger):
    run = ledger.reserve("oncology", "gbsg2", 0.5, 1e-7, user="alice", pid=1)
    ledger.settle(run, 0.5, record={})
    again = ledger_registry(site, Ledger(site))
    assert value(again, "paitient_ledger_epsilon_spent", project="oncology", dataset="gbsg2") == 0.5
