"""The accounts a workspace makes: recorded, listed, pruned, taken over by a fresh state directory when an
earlier one left them behind, and a clear answer when names run out. Real accounts, unique per test (a random
prefix), every one removed afterwards, also when a test fails."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from paitient import sysaccounts
from paitient.config import load
from paitient.hub.accounts import NoAccountName, ensure_account
from paitient.hub.naming import candidates
from paitient.registry import Registry
from paitient.sysaccounts import AccountRecord

PAITIENT = [sys.executable, "-m", "paitient.cli"]


def accounts_with(prefix: str) -> list[pwd.struct_passwd]:
    return [pw for pw in pwd.getpwall() if pw.pw_name.startswith(prefix)]


def sweep(prefix: str) -> None:
    for pw in accounts_with(prefix):
        sysaccounts.end_processes(pw.pw_uid)
        subprocess.run(["userdel", "--remove", pw.pw_name], capture_output=True)


@pytest.fixture
def prefix():
    """A prefix no other account on the machine has; every account starting with it is removed afterwards."""
    p = f"q{secrets.token_hex(2)}-"
    assert not accounts_with(p)
    yield p
    sweep(p)
    assert not accounts_with(p), "accounts left behind"


def site_for(root: Path, prefix: str, name: str = "state", **sections):
    overrides = {
        "workspace": {"state_dir": str(root / name)},
        "accounts": {"prefix": prefix, "home_root": str(root / "homes")},
        "jobs": {"account": f"{prefix}jobs"},
        "airlock": {"audit_account": f"{prefix}audit"},
    }
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    return load(None, overrides=overrides)


def sign_in(site, username: str):
    return ensure_account(site, username, projects=("oncology",), roles=("researcher",))


def run_as(uid: int, gid: int) -> subprocess.Popen:
    def drop() -> None:
        os.setgid(gid)
        os.setuid(uid)

    return subprocess.Popen(["sleep", "300"], preexec_fn=drop)  # noqa: PLW1509 - the test's own child


def test_the_record_lists_each_account_with_its_user_and_role(world_tmp, prefix):
    site = site_for(world_tmp, prefix)
    alice = sign_in(site, "alice")
    jobs = sysaccounts.ensure_worker_account(site.state_dir, site.jobs.account, sysaccounts.JOBS)
    record = AccountRecord(site.state_dir)
    st = os.stat(record.path)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    made = {m.account: m for m in record.all()}
    assert set(made) == {alice.account, site.jobs.account}
    assert (made[alice.account].role, made[alice.account].username, made[alice.account].uid) == (
        "user",
        "alice",
        alice.uid,
    )
    assert made[alice.account].home == str(Path(site.accounts.home_root) / alice.account)
    assert (made[site.jobs.account].role, made[site.jobs.account].uid) == ("jobs", jobs.pw_uid)
    # each account's comment names the state directory that made it
    assert pwd.getpwnam(alice.account).pw_gecos == f"paitient alice @{site.state_dir}"
    assert pwd.getpwnam(site.jobs.account).pw_gecos == f"paitient jobs @{site.state_dir}"

    listed = subprocess.run(
        [*PAITIENT, "accounts", "list", "--json", f"--state-dir={site.state_dir}"] + _site_args(site, world_tmp),
        capture_output=True,
        text=True,
        check=True,
    )
    rows = {r["account"]: r for r in json.loads(listed.stdout)}
    assert rows[alice.account]["wanted"] and rows[alice.account]["exists"]
    assert rows[site.jobs.account]["wanted"] and rows[site.jobs.account]["role"] == "jobs"


def _site_args(site, root: Path) -> list[str]:
    """A site file with the test's [accounts], [jobs] and [airlock] settings, for the command line."""
    path = root / "site.toml"
    path.write_text(
        f'[accounts]\nprefix = "{site.accounts.prefix}"\nhome_root = "{site.accounts.home_root}"\n'
        f'[jobs]\naccount = "{site.jobs.account}"\n[airlock]\naudit_account = "{site.airlock.audit_account}"\n'
    )
    return [f"--site={path}"]


def test_prune_removes_a_retired_users_account_its_processes_and_home_and_keeps_the_rest(world_tmp, prefix):
    site = site_for(world_tmp, prefix)
    alice, bob = sign_in(site, "alice"), sign_in(site, "bob")
    bob_pw = pwd.getpwnam(bob.account)
    (Path(bob_pw.pw_dir) / "notes.txt").write_text("bob's work")
    proc = run_as(bob_pw.pw_uid, bob_pw.pw_gid)
    try:
        args = [f"--state-dir={site.state_dir}", *_site_args(site, world_tmp)]
        dry = subprocess.run(
            [*PAITIENT, "accounts", "prune", "--user=bob", "--dry-run", *args], capture_output=True, text=True
        )
        assert dry.returncode == 0, dry.stderr
        assert f"would remove {bob.account}" in dry.stdout and alice.account not in dry.stdout
        assert pwd.getpwnam(bob.account).pw_uid == bob.uid and proc.poll() is None  # a dry run changes nothing
        assert Registry.for_state_dir(site.state_dir).by_username("bob") is not None

        done = subprocess.run([*PAITIENT, "accounts", "prune", "--user=bob", *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert f"removed {bob.account}" in done.stdout
        assert proc.wait(timeout=10) == -9  # ended by uid before the account went
        with pytest.raises(KeyError):
            pwd.getpwnam(bob.account)
        assert not Path(bob_pw.pw_dir).exists()
        assert pwd.getpwnam(alice.account).pw_uid == alice.uid
        assert Registry.for_state_dir(site.state_dir).by_username("bob") is None
        assert {m.account for m in AccountRecord(site.state_dir).all()} == {alice.account}
        records = [json.loads(line) for p in (site.state_dir / "audit").rglob("*.jsonl") for line in p.open()]
        removed = [r for r in records if r["action"] == "accounts.remove"]
        assert [(r["object"], r["outcome"], r["details"]["uid"]) for r in removed] == [(bob.account, "ok", bob.uid)]
        assert any(r["action"] == "accounts.retire" and r["object"] == "bob" for r in records)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_prune_removes_a_worker_account_the_settings_no_longer_name(world_tmp, prefix):
    site = site_for(world_tmp, prefix)
    old = sysaccounts.ensure_worker_account(site.state_dir, site.jobs.account, sysaccounts.JOBS)
    renamed = site_for(world_tmp, prefix, jobs={"account": f"{prefix}train"})
    workers = {"jobs": renamed.jobs.account, "audit": renamed.airlock.audit_account}
    outcomes = sysaccounts.prune(renamed.state_dir, home_root=renamed.accounts.home_root, worker_accounts=workers)
    assert [(o["account"], o["removed"]) for o in outcomes] == [(old.pw_name, True)]
    assert "no longer name" in str(outcomes[0]["why"])
    with pytest.raises(KeyError):
        pwd.getpwnam(old.pw_name)


def test_prune_all_removes_every_account_the_workspace_made_and_nothing_else(world_tmp, prefix, make_system_user):
    site = site_for(world_tmp, prefix)
    bystander = make_system_user("bystander")  # not made by the workspace: never touched
    alice = sign_in(site, "alice")
    sysaccounts.ensure_worker_account(site.state_dir, site.jobs.account, sysaccounts.JOBS)
    sysaccounts.ensure_worker_account(site.state_dir, site.airlock.audit_account, sysaccounts.AUDIT)
    r = subprocess.run(
        [*PAITIENT, "accounts", "prune", "--all", f"--state-dir={site.state_dir}", *_site_args(site, world_tmp)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert not accounts_with(prefix)
    assert not (Path(site.accounts.home_root) / alice.account).exists()
    assert AccountRecord(site.state_dir).all() == []
    assert Registry.for_state_dir(site.state_dir).by_username("alice") is None  # signs in afresh next time
    assert pwd.getpwnam(bystander.pw_name).pw_uid == bystander.pw_uid


def test_prune_leaves_an_account_someone_recreated_with_another_uid(world_tmp, prefix):
    site = site_for(world_tmp, prefix)
    alice = sign_in(site, "alice")
    sysaccounts.remove_account(alice.account, alice.uid, home_root=site.accounts.home_root)
    subprocess.run(["useradd", "--uid", str(alice.uid + 7), alice.account], check=True, capture_output=True)
    outcomes = sysaccounts.prune(site.state_dir, home_root=site.accounts.home_root, worker_accounts={}, everything=True)
    assert "someone recreated it" in str(outcomes[0]["error"])
    assert pwd.getpwnam(alice.account).pw_uid == alice.uid + 7


def test_a_fresh_state_directory_takes_over_a_leftover_account_empty(world_tmp, prefix):
    first = site_for(world_tmp, prefix, "state-1")
    old = sign_in(first, "alice")
    (Path(first.accounts.home_root) / old.account / "notebook.ipynb").write_text("{}")
    shutil.rmtree(first.state_dir)  # the earlier workspace is gone, its account left behind

    second = site_for(world_tmp, prefix, "state-2")
    new = sign_in(second, "alice")
    assert new.account == old.account == f"{prefix}alice"  # the name is not lost
    pw = pwd.getpwnam(new.account)
    assert pw.pw_gecos == f"paitient alice @{second.state_dir}"
    assert pw.pw_dir == str(Path(second.accounts.home_root) / new.account)
    assert "notebook.ipynb" not in os.listdir(pw.pw_dir)  # made anew: the earlier workspace's files are gone
    assert [m.account for m in AccountRecord(second.state_dir).all()] == [new.account]
    assert [a.pw_name for a in accounts_with(prefix)] == [new.account]


def test_an_account_a_live_workspace_still_records_is_not_taken(world_tmp, prefix):
    first = site_for(world_tmp, prefix, "state-1")
    theirs = sign_in(first, "alice")
    second = site_for(world_tmp, prefix, "state-2")
    ours = sign_in(second, "alice")
    assert ours.account != theirs.account and ours.account.startswith(f"{prefix}alice-")
    assert pwd.getpwnam(theirs.account).pw_uid == theirs.uid


def test_an_account_made_for_another_user_or_by_hand_is_not_taken(world_tmp, prefix):
    site = site_for(world_tmp, prefix)
    subprocess.run(
        ["useradd", "--comment", "paitient bob @/nonexistent-state", f"{prefix}alice"], check=True, capture_output=True
    )
    subprocess.run(["useradd", "--comment", "Alice Smith", f"{prefix}carol"], check=True, capture_output=True)
    a, c = sign_in(site, "alice"), sign_in(site, "carol")
    assert a.account != f"{prefix}alice" and c.account != f"{prefix}carol"
    assert pwd.getpwnam(f"{prefix}alice").pw_gecos == "paitient bob @/nonexistent-state"


def test_running_out_of_names_says_what_to_do(world_tmp, prefix):
    from tornado import web

    from paitient.hub.spawner import ACCOUNT_UNAVAILABLE, PaitientLocalSpawner

    site = site_for(world_tmp, prefix)
    for name in candidates("alice", prefix):  # every name alice could get, taken by someone else
        subprocess.run(["useradd", "--comment", "not paitient's", name], check=True, capture_output=True)
    with pytest.raises(NoAccountName, match="paitient accounts prune"):
        sign_in(site, "alice")

    # the hub's spawn: an HTTP 503 whose page tells the researcher to contact the operator (not a 500)
    spawner = PaitientLocalSpawner(
        user=SimpleNamespace(name="alice", groups=[], roles=[]), site_state_dir=str(site.state_dir)
    )
    spawner._site = site
    with pytest.raises(web.HTTPError) as caught:
        asyncio.run(spawner.start())
    assert caught.value.status_code == 503
    assert caught.value.jupyterhub_message == ACCOUNT_UNAVAILABLE  # type: ignore[attr-defined]
    assert "operator" in ACCOUNT_UNAVAILABLE
    records = [json.loads(line) for p in (site.state_dir / "audit").rglob("*.jsonl") for line in p.open()]
    spawns = [r for r in records if r["action"] == "server.spawn"]
    assert len(spawns) == 1 and spawns[0]["outcome"] == "error"
    assert "paitient accounts prune" in spawns[0]["details"]["reason"]  # the operator's remedy is on record


def test_a_failed_spawn_while_the_trail_is_down_is_still_the_researchers_503_and_is_recorded_once_it_is_back(
    world_tmp, prefix
):
    """The spawner's records come after what they record: a trail that is down must neither turn the
    researcher's 503 into an internal error nor lose the record; it waits, and the hub's next record brings it."""
    from tornado import web

    from paitient.hub import records
    from paitient.hub.spawner import PaitientLocalSpawner
    from tests.trail import trail_down, trail_records

    site = site_for(world_tmp, prefix)
    for name in candidates("alice", prefix):
        subprocess.run(["useradd", "--comment", "not paitient's", name], check=True, capture_output=True)
    spawner = PaitientLocalSpawner(
        user=SimpleNamespace(name="alice", groups=[], roles=[]), site_state_dir=str(site.state_dir)
    )
    spawner._site = site
    with trail_down(site):
        with pytest.raises(web.HTTPError) as caught:
            asyncio.run(spawner.start())
        assert caught.value.status_code == 503
    assert trail_records(site, action="server.spawn") == []
    assert records.backlog(site).waiting == 1
    # The hub's next record brings it: the first one at once, unless the refused try was slow (a busy
    # machine), after which the backlog waits RETRY_WAIT times as long before it tries the trail again.
    deadline = time.monotonic() + 60
    while not trail_records(site, action="server.spawn"):
        assert time.monotonic() < deadline, "the waiting record never reached the trail"
        records.record(site, actor="system", action="hub.test", details={})
        time.sleep(0.05)
    (spawn,) = trail_records(site, action="server.spawn")
    assert spawn["outcome"] == "error" and "paitient accounts prune" in spawn["details"]["reason"]
    assert "happened" in spawn["details"] and records.backlog(site).waiting == 0


@pytest.mark.parametrize("name", ["nobody", "root", "Bad_Name"])
def test_a_shared_or_malformed_worker_account_is_refused(world_tmp, name):
    from paitient.config import ConfigError

    with pytest.raises(ConfigError, match="dedicated account"):
        load(None, overrides={"airlock": {"audit_account": name}})
    with pytest.raises(ConfigError, match="dedicated account"):
        load(None, overrides={"jobs": {"account": name}})
    with pytest.raises(sysaccounts.SystemAccountError):
        sysaccounts.ensure_worker_account(world_tmp / "state", name, sysaccounts.AUDIT)


def test_the_two_workers_may_not_share_an_account():
    from paitient.config import ConfigError

    with pytest.raises(ConfigError, match="must differ from \\[jobs\\] account"):
        load(None, overrides={"jobs": {"account": "pt-worker"}, "airlock": {"audit_account": "pt-worker"}})


def test_the_default_audit_account_is_dedicated():
    site = load(None)
    assert site.airlock.audit_account == "paitient-audit" != site.jobs.account


def _prepare_like_the_hub(site, username: str):
    """The blocking part of the hub's spawn (:meth:`PaitientLocalSpawner._prepare`): account, registry,
    root-owned server configuration."""
    from paitient.hub.spawner import PaitientLocalSpawner

    spawner = PaitientLocalSpawner(
        user=SimpleNamespace(name=username, groups=[], roles=[]),
        site_state_dir=str(site.state_dir),
        provide_examples=False,
    )
    spawner._site = site
    return spawner._prepare()


def test_an_accounts_server_configuration_is_closed_to_the_other_accounts(world_tmp, prefix):
    # Each server's configuration names its account's projects and datasets; the other researchers' servers
    # run as accounts of their own and must not read it.
    site = site_for(world_tmp, prefix)
    try:
        alice, bob = _prepare_like_the_hub(site, "alice"), _prepare_like_the_hub(site, "bob")
        config = site.state_dir / "users" / alice.account / "config" / "jupyter_server_config.json"

        def read_as(account: str) -> subprocess.CompletedProcess:
            pw = pwd.getpwnam(account)
            return subprocess.run(
                ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "cat", str(config)],
                capture_output=True,
                text=True,
            )

        assert read_as(alice.account).returncode == 0 and '"ServerApp"' in read_as(alice.account).stdout
        denied = read_as(bob.account)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        st = config.parent.parent.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, pwd.getpwnam(alice.account).pw_gid, 0o750)
    finally:
        sysaccounts.prune(site.state_dir, home_root=site.accounts.home_root, worker_accounts={}, everything=True)


def test_fifty_fresh_state_directories_in_a_row_leave_no_account_behind(world_tmp, prefix):
    """Each round: a new state directory, alice's spawn preparation as the hub does it, `paitient accounts
    prune --all` (what uninstall runs); then no account of the prefix may remain."""
    started = time.monotonic()
    for i in range(50):
        site = site_for(world_tmp, prefix, f"state-{i}")
        member = _prepare_like_the_hub(site, "alice")
        assert member.account == f"{prefix}alice", f"round {i}: {member.account}"
        assert (site.state_dir / "users" / member.account / "config").is_dir()
        outcomes = sysaccounts.prune(
            site.state_dir, home_root=site.accounts.home_root, worker_accounts={}, everything=True
        )
        assert [o["removed"] for o in outcomes] == [True], f"round {i}: {outcomes}"
        assert not accounts_with(prefix), f"round {i} left {[a.pw_name for a in accounts_with(prefix)]}"
        assert not (Path(site.accounts.home_root) / member.account).exists()
        shutil.rmtree(site.state_dir)
    assert time.monotonic() - started < 120


def test_fifty_state_directories_dropped_without_uninstall_reuse_one_account(world_tmp, prefix):
    """The leak as it happened: state directories deleted with no uninstall. Each fresh one takes over the
    leftover instead of picking a new name, so alice has one account throughout, never a 500."""
    for i in range(50):
        site = site_for(world_tmp, prefix, f"state-{i}")
        member = _prepare_like_the_hub(site, "alice")
        assert member.account == f"{prefix}alice", f"round {i}: {member.account}"
        assert [a.pw_name for a in accounts_with(prefix)] == [member.account], f"round {i}"
        shutil.rmtree(site.state_dir)
