"""``paitient ledger show`` and ``paitient ledger set-budget``: the privacy ledger for stewards (as root)."""

from __future__ import annotations

import datetime
import getpass
import json

from traitlets import Bool, Float, Unicode

from paitient.app import CommandGroup, PaitientCommand
from paitient.services.ledger.api import public_run
from paitient.services.ledger.store import Ledger, LedgerError


def format_budget(rows: list[dict]) -> list[str]:
    lines = [
        f"{'dataset':<20}{'eps total':>10}{'spent':>9}{'reserved':>10}{'left':>9}{'delta total':>13}"
        f"{'delta left':>12}{'runs':>6}  set by"
    ]
    for b in rows:
        lines.append(
            f"{b['dataset']:<20}{b['epsilon_total']:>10.4g}{b['epsilon_spent']:>9.4g}"
            f"{b['epsilon_reserved']:>10.4g}{b['epsilon_left']:>9.4g}{b['delta_total']:>13.3g}"
            f"{b['delta_left']:>12.3g}{b['runs']:>6}  {b['source']}"
        )
    return lines


def format_runs(runs: list[dict]) -> list[str]:
    lines = [
        f"  {'reserved at (UTC)':<20}{'dataset':<16}{'user':<14}{'state':<9}{'eps res':>8}{'spent':>8}"
        f"  {'mode':<6}{'steps':>6}  weights sha256    run"
    ]
    for r in runs:
        when = datetime.datetime.fromtimestamp(r["created"], datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        rec = r["record"] or {}
        spent = "" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.4g}"
        lines.append(
            f"  {when:<20}{r['dataset']:<16}{r['username'][:13]:<14}{r['state']:<9}{r['epsilon']:>8.4g}"
            f"{spent:>8}  {str(rec.get('mode', '')):<6}{str(rec.get('steps', '')):>6}  "
            f"{(r['weights_sha256'] or '-')[:16]:<16}  {r['id']}"
        )
    return lines


class LedgerShow(PaitientCommand):
    name = "ledger show"
    description = (
        "Per project and dataset: total, spent, reserved and left epsilon and delta "
        "(composition: epsilons and deltas add up); with --runs every run and its record."
    )
    project = Unicode("", help="Only this project (default: all).").tag(config=True)
    runs = Bool(False, help="List the runs too.").tag(config=True)
    json_output = Bool(False, help="Print JSON.").tag(config=True)
    aliases = {**PaitientCommand.aliases, "project": "LedgerShow.project"}
    flags = {
        "runs": ({"LedgerShow": {"runs": True}}, "List the runs too."),
        "json": ({"LedgerShow": {"json_output": True}}, "Print JSON."),
    }

    def start(self) -> None:
        self.require_root()
        site = self.load_site()
        projects = [p.name for p in site.projects]
        if self.project:
            if self.project not in projects:
                self.fail(f"no project {self.project!r}; projects: {', '.join(projects) or 'none'}")
            projects = [self.project]
        ledger = Ledger(site)
        out = {p: {"budget": ledger.budget(p), "runs": [public_run(r) for r in ledger.runs(p)]} for p in projects}
        if self.json_output:
            print(json.dumps(out, indent=2))
            return
        for p, data in out.items():
            print(f"project {p}")
            for line in format_budget(data["budget"]):
                print("  " + line)
            if self.runs:
                print(*format_runs(data["runs"]) or ["  no runs"], sep="\n")
            print()


class LedgerSetBudget(PaitientCommand):
    name = "ledger set-budget"
    description = (
        "Record a steward's total (epsilon, delta) for one dataset, replacing the site "
        "configuration's; --clear goes back to the site configuration. "
        "Example: paitient ledger set-budget --project=oncology --dataset=gbsg2 --epsilon=5 --delta=1e-5"
    )
    project = Unicode("", help="Project.").tag(config=True)
    dataset = Unicode("", help="Dataset of the project.").tag(config=True)
    epsilon = Float(0.0, help="Total epsilon.").tag(config=True)
    delta = Float(0.0, help="Total delta.").tag(config=True)
    steward = Unicode("", help="Who decided (recorded with the total; default: the login name).").tag(config=True)
    clear = Bool(False, help="Remove the override.").tag(config=True)
    aliases = {
        **PaitientCommand.aliases,
        "project": "LedgerSetBudget.project",
        "dataset": "LedgerSetBudget.dataset",
        "epsilon": "LedgerSetBudget.epsilon",
        "delta": "LedgerSetBudget.delta",
        "steward": "LedgerSetBudget.steward",
    }
    flags = {"clear": ({"LedgerSetBudget": {"clear": True}}, "Remove the override.")}

    def start(self) -> None:
        self.require_root()
        if not (self.project and self.dataset):
            self.fail("name the dataset: --project=NAME --dataset=NAME")
        site = self.load_site()
        ledger = Ledger(site)
        by = self.steward or getpass.getuser()
        from paitient.services.audit import emit

        details = {"project": self.project, "epsilon": self.epsilon, "delta": self.delta, "cleared": self.clear}
        what = {"actor": by, "action": "ledger.budget", "object": f"{self.project}/{self.dataset}"}
        try:  # checked, recorded, then changed: no change that the trail does not hold
            if self.clear:
                ledger.check_dataset(self.project, self.dataset)
            else:
                ledger.check_budget(self.project, self.dataset, self.epsilon, self.delta)
        except LedgerError as e:
            self.fail(str(e))
        try:
            emit(site, **what, details=details)
        except Exception as e:
            self.fail(f"the budget was not changed: the audit trail cannot record the change ({e})")
        try:
            if self.clear:
                ledger.clear_budget(self.project, self.dataset)
            else:
                ledger.set_budget(self.project, self.dataset, self.epsilon, self.delta, by=by)
        except Exception as e:
            try:  # the trail holds the change it recorded above: say that it did not happen
                emit(site, **what, outcome="error", details={**details, "reason": str(e)[:500]})
            finally:
                self.fail(f"the budget was not changed: {e}")
        for line in format_budget([b for b in ledger.budget(self.project) if b["dataset"] == self.dataset]):
            print(line)


class LedgerCommand(CommandGroup):
    name = "ledger"
    description = "The privacy-budget ledger: paitient ledger {show,set-budget} --help"
    commands = {"show": LedgerShow, "set-budget": LedgerSetBudget}
