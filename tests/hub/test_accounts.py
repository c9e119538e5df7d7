"""System accounts: created on first sign-in with a private home, reused after, never taken over."""

import os
import pwd
import subprocess

import pytest

from paitient.config import load
from paitient.hub.accounts import AccountError, ensure_account
from paitient.registry import Registry
from tests import accounts


@pytest.fixture
def site(world_tmp):
    site = load(
        None,
        overrides={
            "workspace": {"state_dir": str(world_tmp / "state")},
            "accounts": {"prefix": "pta", "home_root": str(world_tmp / "homes")},
        },
    )
    yield site
    accounts.remove_all(m.account for m in Registry.for_state_dir(site.state_dir).all())


def test_first_sign_in_creates_a_private_account(site):
    m = ensure_account(site, "alice", projects=("oncology",), roles=("researcher",))
    pw = pwd.getpwnam(m.account)
    assert m.account.startswith("pta") and "alice" in m.account
    assert pw.pw_uid == m.uid >= site.accounts.uid_min
    assert pw.pw_dir == f"{site.accounts.home_root}/{m.account}"
    st = os.stat(pw.pw_dir)
    assert st.st_uid == m.uid and (st.st_mode & 0o777) == 0o700
    assert pw.pw_shell == "/usr/sbin/nologin"
    assert Registry.for_state_dir(site.state_dir).by_uid(m.uid).projects == ("oncology",)


def test_second_sign_in_reuses_the_account_and_updates_projects(site):
    first = ensure_account(site, "carol", projects=("oncology",), roles=("researcher",))
    again = ensure_account(site, "carol", projects=("oncology", "cardiometabolic"), roles=("researcher",))
    assert (again.account, again.uid) == (first.account, first.uid)
    assert Registry.for_state_dir(site.state_dir).by_username("carol").projects == ("oncology", "cardiometabolic")


def test_existing_system_account_is_never_taken_over(site, make_system_user):
    # A machine account that happens to have the name paitient would derive is not reused.
    other = make_system_user("bystander")
    m = ensure_account(site, other.pw_name.removeprefix("ptt"), projects=(), roles=())
    assert m.account != other.pw_name and m.uid != other.pw_uid


def test_odd_directory_names_get_safe_distinct_accounts(site):
    a = ensure_account(site, "j.doe", projects=(), roles=())
    b = ensure_account(site, "j-doe", projects=(), roles=())
    assert a.account != b.account
    assert all(c.isalnum() or c == "-" for c in a.account + b.account)


def test_recreated_account_with_another_uid_is_refused(site):
    m = ensure_account(site, "bob", projects=(), roles=())
    subprocess.run(["userdel", "--remove", m.account], check=True, capture_output=True)
    with pytest.raises(AccountError, match="was removed from the system"):
        ensure_account(site, "bob", projects=(), roles=())
    subprocess.run(["useradd", "--uid", str(m.uid + 1), m.account], check=True, capture_output=True)
    with pytest.raises(AccountError, match="someone recreated it"):
        ensure_account(site, "bob", projects=(), roles=())


def test_no_member_is_root(site):
    from paitient.registry import Member

    registry = Registry.for_state_dir(site.state_dir)
    with pytest.raises(ValueError, match="uid 0 is root"):
        registry.put(Member("mallory", "root", 0, ("oncology",), ("researcher",)))
    assert registry.by_username("mallory") is None and registry.by_uid(0) is None
