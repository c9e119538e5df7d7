"""``paitient accounts``: the system accounts a workspace made; remove those nobody wants any more (root)."""

from __future__ import annotations

import json
import time
from typing import Any

from traitlets import Bool, Unicode

from paitient import sysaccounts
from paitient.app import CommandGroup, PaitientCommand
from paitient.config import SiteConfig
from paitient.registry import Registry


def worker_accounts(site: SiteConfig) -> dict[str, str]:
    """role -> the account the site configuration names for that worker."""
    return {sysaccounts.JOBS: site.jobs.account, sysaccounts.AUDIT: site.airlock.audit_account}


class AccountsList(PaitientCommand):
    name = "list"
    description = "List the system accounts the workspace made, whom each serves and whether it is still wanted."
    as_json = Bool(False, help="Print JSON instead of a table.").tag(config=True)
    flags = {"json": ({"AccountsList": {"as_json": True}}, "Print JSON.")}

    def start(self) -> None:
        self.require_root()
        site = self.load_site()
        try:
            verdicts = sysaccounts.review(site.state_dir, worker_accounts=worker_accounts(site))
        except sysaccounts.SystemAccountError as e:
            self.fail(str(e))
        rows = [{**vars(v.made), "wanted": v.wanted, "why": v.why, "exists": _exists(v.made)} for v in verdicts]
        if self.as_json:
            print(json.dumps(rows, indent=2))
            return
        if not rows:
            print(f"no accounts recorded in {sysaccounts.AccountRecord(site.state_dir).path}")
            return
        print(f"{'account':24} {'uid':>7} {'role':6} {'user':16} {'created (UTC)':17} {'state':9} why")
        for r in rows:
            when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["created"]))
            state = ("wanted" if r["wanted"] else "unwanted") if r["exists"] else "missing"
            print(f"{r['account']:24} {r['uid']:>7} {r['role']:6} {r['username']:16} {when:17} {state:9} {r['why']}")


def _exists(made: sysaccounts.Made) -> bool:
    import pwd

    try:
        return pwd.getpwnam(made.account).pw_uid == made.uid
    except KeyError:
        return False


class AccountsPrune(PaitientCommand):
    name = "prune"
    description = (
        "Remove the accounts the workspace made that nothing wants any more (no registry entry, or a worker "
        "account the settings no longer name): their processes are ended, the account and its group deleted, "
        "its home removed when it lies in [accounts] home_root. --all removes every account the workspace made "
        "(uninstall); --user NAME retires one directory user first."
    )
    examples = (
        "paitient accounts prune --dry-run\npaitient accounts prune --user=alice\n"
        "paitient accounts prune --all --site=/etc/paitient/site.toml"
    )
    everything = Bool(False, help="Remove every account the workspace made, wanted or not (uninstall).").tag(
        config=True
    )
    dry_run = Bool(False, help="Only say what would be removed.").tag(config=True)
    user = Unicode("", help="Retire this directory user: drop their registry entry, then prune.").tag(config=True)
    as_json = Bool(False, help="Print JSON.").tag(config=True)
    aliases = {**PaitientCommand.aliases, "user": "AccountsPrune.user"}
    flags = {
        "all": ({"AccountsPrune": {"everything": True}}, "Remove every account the workspace made (uninstall)."),
        "dry-run": ({"AccountsPrune": {"dry_run": True}}, "Only say what would be removed."),
        "json": ({"AccountsPrune": {"as_json": True}}, "Print JSON."),
    }

    def start(self) -> None:
        self.require_root()
        site = self.load_site()
        registry = Registry.for_state_dir(site.state_dir)
        if self.user:
            if registry.by_username(self.user) is None:
                self.fail(
                    f"no user {self.user!r} in the registry {registry.path} (`paitient accounts list` shows them)"
                )
            if not self.dry_run:
                registry.remove(self.user)
                _audit(site, "accounts.retire", self.user, {"username": self.user})
        retired = frozenset({self.user} if self.user else ())
        try:
            outcomes = prune_accounts(site, everything=self.everything, retired=retired, dry_run=self.dry_run)
        except sysaccounts.SystemAccountError as e:
            self.fail(str(e))
        if self.as_json:
            print(json.dumps(outcomes, indent=2))
        elif not outcomes:
            print("nothing to remove: every recorded account is still wanted")
        for o in outcomes if not self.as_json else ():
            print(describe_outcome(o))
        if any(o.get("error") for o in outcomes):
            self.exit(1)


def prune_accounts(
    site: SiteConfig, *, everything: bool, retired: frozenset[str] = frozenset(), dry_run: bool = False
) -> list[dict[str, object]]:
    """Remove the accounts the workspace made that nothing wants (every one with ``everything``), each removal
    audited; with ``everything`` the removed users' registry entries go too. Returns the outcomes."""
    registry = Registry.for_state_dir(site.state_dir)
    outcomes = sysaccounts.prune(
        site.state_dir,
        home_root=site.accounts.home_root,
        worker_accounts=worker_accounts(site),
        everything=everything,
        retired=retired,
        dry_run=dry_run,
        report=lambda o: None if dry_run else _audit(site, "accounts.remove", str(o["account"]), o),
    )
    if everything and not dry_run:
        for o in outcomes:
            if o.get("removed") and o["role"] == sysaccounts.USER and o["username"]:
                registry.remove(str(o["username"]))
    return outcomes


def describe_outcome(o: dict[str, object]) -> str:
    """One line for the operator about one account's outcome."""
    if o.get("dry_run"):
        return f"would remove {o['account']} (uid {o['uid']}, {o['role']}): {o['why']}"
    if o.get("error"):
        return f"could not remove {o['account']}: {o['error']}"
    if o.get("removed"):
        home = f", home {o['home']} removed" if o.get("home_removed") else ""
        return f"removed {o['account']} (uid {o['uid']}, {o['role']}){home}"
    return f"{o['account']}: {o.get('reason', 'not removed')}; dropped from the record"


def _audit(site: SiteConfig, action: str, obj: str, details: dict[str, Any]) -> None:
    from paitient.services import audit

    outcome = "error" if details.get("error") else "ok"
    audit.emit(site, actor="operator", action=action, object=obj, outcome=outcome, details=dict(details))


class AccountsCommand(CommandGroup):
    name = "accounts"
    description = "The system accounts the workspace made: list them, remove those nobody wants (prune)."
    commands = {"list": AccountsList, "prune": AccountsPrune}
