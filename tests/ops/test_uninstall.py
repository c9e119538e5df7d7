"""`paitient uninstall`: the units `install` wrote and the accounts the workspace made are gone; the state, its
audit trail and keys, and the data stay unless the operator says otherwise (the data always).

Run as the command an operator runs (`python -m paitient.cli uninstall`), on units written by `install` into a
folder of the test, with a real account made by the workspace's own sign-in path. systemd is not process 1 in
the test container: the command says so and removes the files only.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

from paitient.config import parse
from paitient.hub.accounts import ensure_account
from paitient.hub.paths import default_proxy_command
from paitient.ops.install import ENGINE_UNIT, HUB_UNIT, TARGET, write_units
from paitient.ops.uninstall import systemd_running
from paitient.registry import Registry
from paitient.services.audit import emit, trail_dir
from paitient.services.audit.verify import verify_dir
from paitient.services.data import access
from paitient.services.jobs import keys
from paitient.sysaccounts import AccountRecord
from tests import accounts
from tests.ops.test_install import SITE_TOML
from tests.trail import trail_records

PROXY = default_proxy_command()


@pytest.fixture
def site(world_tmp):
    """A production-like site (state under /var/lib) whose accounts are ``ptu*`` with homes in the test's folder;
    any account still there after the test is removed (and fails it)."""
    state = Path(tempfile.mkdtemp(prefix="paitient-uninstall-test-", dir="/var/lib"))
    text = SITE_TOML.format(state_dir=state, port=18080, api_port=18001)
    text += f'\n[accounts]\nprefix = "ptu"\ngroup = "ptu-workspace"\nhome_root = "{world_tmp / "homes"}"\n'
    (state / "site.toml").write_text(text)
    (world_tmp / "homes").mkdir(mode=0o755)
    site = parse(tomllib.loads(text), source=str(state / "site.toml"))
    yield site
    left = [m.account for m in Registry.for_state_dir(state).all()] if state.exists() else []
    left += [m.account for m in AccountRecord(state).all()] if state.exists() else []
    try:
        accounts.remove_all(dict.fromkeys(left))
    finally:
        shutil.rmtree(state, ignore_errors=True)
        groups_left = [g for g in ("ptuproj-oncology", "ptu-workspace") if group_exists(g)]
        for name in groups_left:
            subprocess.run(["groupdel", name], capture_output=True, check=False)
        assert groups_left == [], f"groups left behind: {groups_left}"


def installed(site, world_tmp) -> tuple[Path, list[Path]]:
    """The units written as `install` writes them, an account made at alice's sign-in, a record in the trail
    and the runner's signing key: what a workspace that ran has."""
    unit_dir = world_tmp / "units"
    written = write_units(site, PROXY, unit_dir)
    (unit_dir / ENGINE_UNIT).write_text("[Unit]\nDescription=someone else's unit of the same name\n")
    ensure_account(site, "alice", projects=("oncology",), roles=("researcher",))
    emit(site, actor="system", action="workspace.start", object=str(site.state_dir))
    keys.ensure_signing_key(site)
    (site.data_root / "oncology").mkdir(parents=True)
    (site.data_root / "oncology" / "marker").write_text("published data\n")
    access.protect_project(site, "oncology")  # as publication does: the project's group reads it
    return unit_dir, written


def uninstall(site, unit_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "paitient.cli", "uninstall", f"--site={site.source}", f"--unit-dir={unit_dir}", *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )


def group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def account_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def actions(site) -> list[str]:
    return [r["action"] for r in trail_records(site)]


def test_uninstall_removes_its_units_and_the_accounts_and_keeps_the_state(site, world_tmp):
    unit_dir, written = installed(site, world_tmp)
    alice = Registry.for_state_dir(site.state_dir).by_username("alice")
    home = Path(pwd.getpwnam(alice.account).pw_dir)
    assert home.is_dir()

    oncology = grp.getgrnam("ptuproj-oncology")
    assert alice.account in oncology.gr_mem and alice.account in grp.getgrnam("ptu-workspace").gr_mem
    marker = site.data_root / "oncology" / "marker"
    assert os.stat(marker).st_gid == oncology.gr_gid  # the project's members read its data

    dry = uninstall(site, unit_dir, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would remove {unit_dir / HUB_UNIT}" in dry.stdout and f"would remove {alice.account}" in dry.stdout
    assert f"would remove group ptuproj-oncology (gid {oncology.gr_gid}) of project oncology; its data" in dry.stdout
    assert "would remove the workspace group ptu-workspace" in dry.stdout
    assert all(p.exists() for p in written) and account_exists(alice.account)  # nothing done
    assert group_exists("ptuproj-oncology") and group_exists("ptu-workspace")

    done = uninstall(site, unit_dir)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert ("systemd is not running on this machine" in out) is not systemd_running()
    assert not any(p.exists() for p in written)
    assert (unit_dir / ENGINE_UNIT).exists() and f"left {unit_dir / ENGINE_UNIT} alone" in out
    assert f"removed {alice.account} (uid {alice.uid}, user), home {home} removed" in out
    assert not account_exists(alice.account) and not home.exists()
    # the groups it made are gone, the project's data made root-only first (no later group of that gid reads it)
    assert f"removed group ptuproj-oncology (gid {oncology.gr_gid}) of project oncology; its data" in out
    assert "removed the workspace group ptu-workspace" in out
    assert not group_exists("ptuproj-oncology") and not group_exists("ptu-workspace")
    st = os.stat(marker)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 0, 0o400)
    assert os.stat(marker.parent).st_mode & 0o777 == 0o700
    assert AccountRecord(site.state_dir).all() == [] and Registry.for_state_dir(site.state_dir).all() == []
    # kept by default: the state, its trail (now with the removal) and keys, the data
    assert f"kept the state directory {site.state_dir}" in out and f"kept the data root {site.data_root}" in out
    assert (site.state_dir / "site.toml").exists() and keys.private_key_path(site).exists()
    assert (site.data_root / "oncology" / "marker").read_text() == "published data\n"
    assert verify_dir(trail_dir(site)).ok and "accounts.remove" in actions(site)
    assert actions(site).index("accounts.remove") < actions(site).index("workspace.groups.remove")

    again = uninstall(site, unit_dir)  # nothing left to do: says so
    assert again.returncode == 0, again.stderr
    assert f"no units of `paitient install` in {unit_dir}" in again.stdout
    assert "no system accounts recorded for this workspace" in again.stdout
    assert "no workspace group ptu-workspace on this machine" in again.stdout


def test_remove_state_keeps_the_audit_trail_the_keys_and_the_data(site, world_tmp):
    unit_dir, _ = installed(site, world_tmp)
    done = uninstall(site, unit_dir, "--remove-state")
    assert done.returncode == 0, done.stderr
    left = sorted(p.name for p in site.state_dir.iterdir())
    assert left == ["audit", "data", "keys", "public"], done.stdout
    assert f"removed {site.state_dir / 'site.toml'}" in done.stdout and f"kept {trail_dir(site)}" in done.stdout
    assert (site.data_root / "oncology" / "marker").exists() and keys.private_key_path(site).exists()
    report = verify_dir(trail_dir(site))
    assert report.ok and actions(site)[-1] == "workspace.uninstall"


def test_keys_and_trail_go_only_with_remove_state_and_the_data_never(site, world_tmp):
    unit_dir, written = installed(site, world_tmp)
    refused = uninstall(site, unit_dir, "--remove-keys-and-trail")
    assert refused.returncode != 0 and "--remove-keys-and-trail goes with --remove-state" in refused.stderr
    assert all(p.exists() for p in written) and (site.state_dir / "audit").exists()  # nothing was done
    done = uninstall(site, unit_dir, "--remove-state", "--remove-keys-and-trail")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in site.state_dir.iterdir()) == ["data"]
    assert (site.data_root / "oncology" / "marker").read_text() == "published data\n"
    assert TARGET not in [p.name for p in unit_dir.iterdir()]
