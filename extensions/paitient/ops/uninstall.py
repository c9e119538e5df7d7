"""``paitient uninstall``: take back what ``paitient install`` and the running workspace put on the machine.

In order (``--dry-run`` says what it would do and does nothing):

1. the units ``install`` wrote (those in ``--unit-dir`` whose first line is install's header; a unit of the
   same name that someone else wrote is left alone): with systemd running as process 1 they are stopped and
   disabled (``systemctl disable --now``) first and systemd reloaded after; without it (a container, a
   machine booted otherwise) there is nothing to stop, and the command says so;
2. every system account the workspace made (what ``paitient accounts prune --all`` does): processes ended,
   account and group deleted, homes under ``[accounts] home_root`` removed, each removal audited;
3. the groups the workspace made, once no account is left in them: each project's group (its published data
   made root-only first, so that no group given the same gid later reads it; ``paitient up`` gives the data
   to the project's new group) and the workspace's group (``[accounts] group``) when this workspace made
   it; each removal audited;
4. only with ``--remove-state``: the state directory, except the audit trail (``audit/``), the keys
   (``keys/``, ``public/``, the pseudonymisation key) and the published data, which stay where they are;
   with ``--remove-keys-and-trail`` as well, those keys and the audit trail too (a ``key_file`` outside the
   state directory is never touched). The data root is never
   removed by this command: it is the hospital's data, deleted by its owner's own procedure.

It refuses while ``paitient up`` runs on the state directory (``paitient stop`` first).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from traitlets import Bool, Unicode

from paitient.app import PaitientCommand
from paitient.config import SiteConfig
from paitient.ops.install import ENGINE_UNIT, HUB_UNIT, PROXY_UNIT, TARGET, service_unit
from paitient.services import SERVICES

INSTALL_HEADER = "# Written by `paitient install"
KEPT_BY_DEFAULT = ("audit", "keys", "public")
"""What ``--remove-state`` keeps under the state directory unless ``--remove-keys-and-trail`` is given."""


def unit_names() -> list[str]:
    """Every unit ``install`` may write, the target first (stopping it stops the rest)."""
    return [TARGET, HUB_UNIT, PROXY_UNIT, ENGINE_UNIT, *(service_unit(name) for name in SERVICES)]


def installed_units(unit_dir: Path) -> tuple[list[Path], list[Path]]:
    """The unit files in ``unit_dir`` that ``install`` wrote, and those of its names that someone else wrote."""
    ours: list[Path] = []
    others: list[Path] = []
    for name in unit_names():
        path = unit_dir / name
        try:
            first = path.read_text().split("\n", 1)[0]
        except FileNotFoundError:
            continue
        (ours if first.startswith(INSTALL_HEADER) else others).append(path)
    return ours, others


def systemd_running() -> bool:
    """Whether systemd is process 1 here (what sd_booted checks: ``/run/systemd/system`` exists)."""
    return os.path.isdir("/run/systemd/system")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def state_plan(site: SiteConfig, *, keys_and_trail: bool) -> tuple[list[Path], list[Path]]:
    """What ``--remove-state`` removes under the state directory, and what it keeps there: the published data
    always; the audit trail and the keys unless ``keys_and_trail``."""
    state = Path(site.state_dir)
    if not state.is_dir():
        return [], []
    keep = [Path(site.data_root)]
    if not keys_and_trail:
        keep += [state / name for name in KEPT_BY_DEFAULT] + [Path(site.key_file)]
    keep = [k for k in keep if _inside(k, state) and k.exists()]
    remove: list[Path] = []
    kept: list[Path] = []

    def walk(folder: Path) -> None:
        for entry in sorted(folder.iterdir()):
            if entry in keep:
                kept.append(entry)
            elif any(_inside(k, entry) for k in keep):
                walk(entry)  # a folder that holds something kept: remove the rest of it
            else:
                remove.append(entry)

    walk(state)
    return remove, kept


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


class UninstallCommand(PaitientCommand):
    name = "uninstall"
    description = (
        "Undo `paitient install`: stop, disable and remove the systemd units it wrote (when systemd runs), then "
        "remove every system account the workspace made (`accounts prune --all`). The state directory, the "
        "keys, the audit trail and the data stay unless --remove-state (and --remove-keys-and-trail) say "
        "otherwise; the data root is never removed. --dry-run says what it would do."
    )
    examples = (
        "paitient uninstall --site=/etc/paitient/site.toml --dry-run\n"
        "paitient uninstall --site=/etc/paitient/site.toml\n"
        "paitient uninstall --site=/etc/paitient/site.toml --remove-state"
    )
    unit_dir = Unicode("/etc/systemd/system", help="Where `paitient install` wrote the unit files.").tag(config=True)
    dry_run = Bool(False, help="Say what would be done, do nothing.").tag(config=True)
    remove_state = Bool(
        False, help="Also remove the state directory, keeping its audit trail, keys and data (never by default)."
    ).tag(config=True)
    remove_keys_and_trail = Bool(
        False, help="With --remove-state: remove the audit trail and the keys too (never the data)."
    ).tag(config=True)
    aliases = {**PaitientCommand.aliases, "unit-dir": "UninstallCommand.unit_dir"}
    flags = {
        "dry-run": ({"UninstallCommand": {"dry_run": True}}, "Say what would be done, do nothing."),
        "remove-state": (
            {"UninstallCommand": {"remove_state": True}},
            "Also remove the state directory, keeping its audit trail, keys and data.",
        ),
        "remove-keys-and-trail": (
            {"UninstallCommand": {"remove_keys_and_trail": True}},
            "With --remove-state: the audit trail and the keys too (never the data).",
        ),
    }

    def start(self) -> None:
        if self.remove_keys_and_trail and not self.remove_state:
            self.fail("--remove-keys-and-trail goes with --remove-state; nothing was done")
        self.require_root()
        site = self.load_site()
        self._refuse_while_up(site)
        self._units()
        leaving = self._accounts(site)
        self._groups(site, leaving)
        if not self.remove_state:
            print(f"paitient: kept the state directory {site.state_dir} (with its audit trail and keys)")
        else:
            self._state(site)
        print(f"paitient: kept the data root {site.data_root}")

    def _refuse_while_up(self, site: SiteConfig) -> None:
        from paitient.hub.paths import HubPaths
        from paitient.ops.up import Running, pid_alive

        running = Running.read(HubPaths.of(site).up_file)
        if running is not None and pid_alive(running.up_pid):
            self.fail(
                f"a workspace runs on {site.state_dir} (paitient up, pid {running.up_pid}); "
                f"run `paitient stop --site={site.source or '...'}` first. Nothing was done."
            )

    def _units(self) -> None:
        unit_dir = Path(self.unit_dir)
        ours, others = installed_units(unit_dir)
        for path in others:
            print(f"paitient: left {path} alone: `paitient install` did not write it")
        if not ours:
            print(f"paitient: no units of `paitient install` in {unit_dir}")
            return
        names = [p.name for p in ours]
        if systemd_running():
            self._systemctl(["disable", "--now", *names])
        else:
            print("paitient: systemd is not running on this machine (no /run/systemd/system): nothing to stop")
        for path in ours:
            if not self.dry_run:
                path.unlink()
            print(f"paitient: {self._removed} {path}")
        if systemd_running():
            self._systemctl(["daemon-reload"])

    @property
    def _removed(self) -> str:
        return "would remove" if self.dry_run else "removed"

    def _systemctl(self, args: list[str]) -> None:
        print(f"paitient: {'would run' if self.dry_run else 'ran'} systemctl {' '.join(args)}")
        if self.dry_run:
            return
        done = subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            self.fail(f"systemctl {' '.join(args)} failed: {done.stderr.strip()}; nothing more was done")

    def _accounts(self, site: SiteConfig) -> set[str]:
        """Remove the accounts; those removed (with --dry-run: those that would be)."""
        from paitient import sysaccounts
        from paitient.accounts_cli import describe_outcome, prune_accounts

        try:
            outcomes = prune_accounts(site, everything=True, dry_run=self.dry_run)
        except sysaccounts.SystemAccountError as e:
            self.fail(str(e))
        if not outcomes:
            print("paitient: no system accounts recorded for this workspace")
        for o in outcomes:
            print(f"paitient: {describe_outcome(o)}")
        if any(o.get("error") for o in outcomes):
            self.fail("some accounts could not be removed (above); the state directory was left as it is")
        return {str(o["account"]) for o in outcomes}

    def _groups(self, site: SiteConfig, leaving: set[str]) -> None:
        """Remove the groups; ``leaving``: the accounts removed (or, --dry-run, to be removed) before."""
        from paitient.services.data.access import AccessError, remove_groups
        from paitient.services.kit.access import remove_workspace_group

        def plan(dry_run: bool) -> list[str]:
            gone = leaving if dry_run else set()  # a dry run counts members as they will be
            return [
                *remove_groups(site, dry_run=dry_run, leaving=gone),
                remove_workspace_group(site, dry_run=dry_run, leaving=gone),
            ]

        try:
            preview = plan(True)
            planned = [line for line in preview if line.startswith("would remove")]
            if planned and not self.dry_run:  # recorded before anything is removed
                from paitient.services import audit

                try:
                    audit.emit(
                        site,
                        actor="operator",
                        action="workspace.groups.remove",
                        object=str(site.state_dir),
                        details={"groups": [line.removeprefix("would remove ") for line in planned]},
                    )
                except Exception as e:
                    self.fail(f"no group was removed: the audit trail cannot record it ({e})")
            lines = preview if self.dry_run else plan(False)
        except (AccessError, RuntimeError) as e:
            self.fail(f"{e}; the state directory was left as it is")
        for line in lines:
            print(f"paitient: {line}")

    def _state(self, site: SiteConfig) -> None:
        remove, kept = state_plan(site, keys_and_trail=self.remove_keys_and_trail)
        if remove and not self.dry_run and not self.remove_keys_and_trail:
            from paitient.services import audit  # the trail stays: it records what was removed

            audit.emit(
                site,
                actor="operator",
                action="workspace.uninstall",
                object=str(site.state_dir),
                details={"removed": [str(p) for p in remove], "kept": [str(p) for p in kept]},
            )
        for path in remove:
            if not self.dry_run:
                _remove(path)
            print(f"paitient: {self._removed} {path}")
        for path in kept:
            print(f"paitient: kept {path}")
        state = Path(site.state_dir)
        if not self.dry_run and state.is_dir() and not any(state.iterdir()):
            state.rmdir()
            print(f"paitient: removed the empty {state}")
