"""``paitient ledger``: stewards' view and budget overrides from the command line, as root."""

import json
import subprocess
import sys

from paitient.services.ledger.store import Ledger


def cli(site, *args):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "paitient.cli",
            "ledger",
            *args,
            f"--site={site.source}",
            f"--state-dir={site.state_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_show_and_set_budget(site, ledger):
    row = ledger.reserve("oncology", "breast_cancer", 3.0, 1e-6, user="alice", pid=1)
    ledger.settle(row, 2.0, record={"mode": "fast", "steps": 12, "weights_sha256": "cd" * 32})
    out = cli(site, "show", "--project=oncology", "--runs")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    bc = next(line for line in lines if line.strip().startswith("breast_cancer "))
    assert bc.split()[:5] == ["breast_cancer", "10", "2", "0", "8"]
    assert any("alice" in line and "settled" in line and "cdcdcdcdcdcdcdcd" in line for line in lines)

    out = cli(
        site,
        "set-budget",
        "--project=oncology",
        "--dataset=breast_cancer",
        "--epsilon=2.5",
        "--delta=1e-5",
        "--steward=sam",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1].split()[:5] == ["breast_cancer", "2.5", "2", "0", "0.5"]
    assert Ledger(site).total_for("oncology", "breast_cancer").epsilon == 2.5

    data = json.loads(cli(site, "show", "--json").stdout)
    assert {b["dataset"]: b["source"] for b in data["oncology"]["budget"]}["breast_cancer"] == "steward"

    out = cli(site, "set-budget", "--project=oncology", "--dataset=breast_cancer", "--clear")
    assert out.returncode == 0 and Ledger(site).total_for("oncology", "breast_cancer").epsilon == 10.0


def test_clear_errors(site, ledger):
    out = cli(site, "set-budget", "--project=oncology", "--dataset=nope", "--epsilon=1", "--delta=1e-6")
    assert out.returncode == 2 and "has no dataset 'nope'; its datasets: breast_cancer, gbsg2" in out.stderr
    out = cli(site, "show", "--project=zzz")
    assert out.returncode == 2 and "no project 'zzz'" in out.stderr
    out = cli(site)
    assert out.returncode == 2 and "paitient ledger show | paitient ledger set-budget" in out.stderr


def test_a_budget_is_not_changed_unless_the_trail_records_the_change(site, ledger):
    from tests.trail import trail_down, trail_records

    args = ("set-budget", "--project=oncology", "--dataset=breast_cancer", "--epsilon=2.5", "--delta=1e-5")
    with trail_down(site):
        out = cli(site, *args)
        assert out.returncode == 2
        assert "the budget was not changed: the audit trail cannot record the change" in out.stderr
        assert ledger.total_for("oncology", "breast_cancer").epsilon == 10.0
        out = cli(site, "set-budget", "--project=oncology", "--dataset=breast_cancer", "--clear")
        assert out.returncode == 2 and "the budget was not changed" in out.stderr
    assert trail_records(site, "ledger.") == []
    assert cli(site, *args).returncode == 0
    assert ledger.total_for("oncology", "breast_cancer").epsilon == 2.5
    ((record,),) = [trail_records(site, "ledger.budget")]
    assert (record["object"], record["outcome"], record["details"]["epsilon"]) == ("oncology/breast_cancer", "ok", 2.5)
