"""System accounts for signed-in users: created on first sign-in, recorded in the registry.

Each directory user gets one local account (``<prefix><name>``, see :mod:`paitient.hub.naming`), with its
own group and a private home (0700) under ``[accounts] home_root``, and is a member of the workspace's group
(``[accounts] group``), which alone may connect to the services' sockets (an account made before the group
existed is added at its next sign-in). The registry ties the account to the
directory user and records the user's projects and roles as of the latest sign-in; the services read it
to know who is calling them. The workspace's record of the accounts it made
(:mod:`paitient.sysaccounts`) lists it too, so that ``paitient accounts prune`` can remove it later.

An account of the name a user would get that is a leftover of an earlier workspace (its comment names a
state directory that no longer exists or no longer records it, it was made for the same user, its uid lies
in ``[accounts]``'s range) is taken over: its processes are ended, it is removed with its home, and it is
made anew, empty. The new user never sees an earlier workspace's files, and names do not run out because
state directories come and go. Any other existing account is never used.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import subprocess
import time
from pathlib import Path

from paitient import sysaccounts
from paitient.config import SiteConfig
from paitient.fsutil import locked
from paitient.hub.naming import NamingError, account_name, system_account_exists
from paitient.registry import Member, Registry
from paitient.services.data import access
from paitient.services.kit.access import workspace_group
from paitient.sysaccounts import AccountRecord, Made


class AccountError(RuntimeError):
    """An account could not be created or does not match the registry; the message says what to do."""


class NoAccountName(AccountError):
    """Every name the user could get is taken: the message tells the operator what to remove."""


def _create(site: SiteConfig, name: str, username: str) -> pwd.struct_passwd:
    a = site.accounts
    home_root = Path(a.home_root)
    home_root.mkdir(mode=0o755, parents=True, exist_ok=True)
    argv = [
        "useradd",
        "--create-home",
        "--home-dir",
        str(home_root / name),
        "--shell",
        a.shell,
        "--user-group",
        "--groups",
        site.accounts.group,
        "--comment",
        sysaccounts.comment(username, site.state_dir),
        "--key",
        f"UID_MIN={a.uid_min}",
        "--key",
        f"UID_MAX={a.uid_max}",
        "--key",
        f"GID_MIN={a.uid_min}",
        "--key",
        f"GID_MAX={a.uid_max}",
        "--key",
        "UMASK=077",
        name,
    ]
    workspace_group(site)
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise AccountError(f"useradd {name} failed (exit {r.returncode}): {r.stderr.strip()}")
    pw = pwd.getpwnam(name)
    os.chmod(pw.pw_dir, 0o700)
    AccountRecord(site.state_dir).add(
        Made(account=name, uid=pw.pw_uid, role=sysaccounts.USER, username=username, home=pw.pw_dir)
    )
    return pw


def _owner(site: SiteConfig, registry: Registry):
    """The user this workspace gives an account name to: its registry's, else its record's (an account made
    just before a crash, with no registry entry yet)."""
    record = AccountRecord(site.state_dir)

    def owner(name: str) -> str | None:
        member = registry.by_account(name)
        if member is not None:
            return member.username
        made = record.get(name)
        if made is None:
            return None
        return made.username if made.role == sysaccounts.USER else f"({made.role} worker)"

    return owner


def leftover(site: SiteConfig, name: str, username: str) -> bool:
    """Whether the existing account ``name`` is a leftover of an earlier workspace made for ``username``
    that no live workspace claims (see the module's description)."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return False  # a group of that name, or nothing: not an account paitient made
    parsed = sysaccounts.parse_comment(pw.pw_gecos)
    if parsed is None:
        return False
    label, where = parsed
    expected = sysaccounts.parse_comment(sysaccounts.comment(username, "/"))
    if expected is None or label != expected[0]:
        return False
    a = site.accounts
    if not a.uid_min <= pw.pw_uid <= a.uid_max:
        return False
    return not sysaccounts.claimed(where, name, pw.pw_uid)


def _take_over(site: SiteConfig, name: str) -> None:
    pw = pwd.getpwnam(name)
    try:
        sysaccounts.remove_account(name, pw.pw_uid, home_root=Path(pw.pw_dir).parent)
    except sysaccounts.SystemAccountError as e:
        raise AccountError(f"could not take over the leftover account {name}: {e}") from None


def join_workspace_group(site: SiteConfig, account: str) -> None:
    """Add ``account`` to the workspace's group if it is not in it (accounts made before the group existed)."""
    gid = workspace_group(site)
    if account in grp.getgrgid(gid).gr_mem:
        return
    r = subprocess.run(
        ["usermod", "--append", "--groups", site.accounts.group, account], capture_output=True, text=True
    )
    if r.returncode != 0:
        raise AccountError(
            f"could not add {account} to the workspace group {site.accounts.group} (exit {r.returncode}): "
            f"{r.stderr.strip()}; run: usermod --append --groups {site.accounts.group} {account}"
        )


def narrow_member(
    site: SiteConfig,
    username: str,
    *,
    projects: tuple[str, ...],
    roles: tuple[str, ...],
    managed: frozenset[str] = frozenset({"researcher", "steward", "admin"}),
) -> list[str]:
    """Take from the registry's entry of ``username`` the projects not in ``projects`` and the ``managed`` roles
    not in ``roles`` (the directory's now), and the account out of those projects' groups; what was taken
    (``project X``, ``role Y``), nothing when the entry holds no more than they grant. Nothing is added: a
    project or role granted since is the next server start's (:func:`ensure_account`)."""
    registry = Registry.for_state_dir(site.state_dir)
    with locked(site.state_dir / "accounts.create.lock"):
        known = registry.by_username(username)
        if known is None:
            return []
        lost = [f"project {p}" for p in known.projects if p not in projects]
        lost += [f"role {r}" for r in known.roles if r in managed and r not in roles]
        if not lost:
            return []
        registry.put(
            dataclasses.replace(
                known,
                projects=tuple(p for p in known.projects if p in projects),
                roles=tuple(r for r in known.roles if r in roles or r not in managed),
                updated=time.time(),
            )
        )
        access.sync_members(site)
    return lost


def ensure_account(site: SiteConfig, username: str, *, projects: tuple[str, ...], roles: tuple[str, ...]) -> Member:
    """Return the user's account, creating it on first sign-in; record projects and roles in the registry."""
    registry = Registry.for_state_dir(site.state_dir)
    registry.path.parent.mkdir(parents=True, exist_ok=True)
    with locked(site.state_dir / "accounts.create.lock"):
        known = registry.by_username(username)
        if known is not None:
            try:
                pw = pwd.getpwnam(known.account)
            except KeyError:
                raise AccountError(
                    f"the account {known.account} of {username[:40]!r} was removed from the system; "
                    f"restore it (uid {known.uid}) or remove the user's entry from {registry.path}"
                ) from None
            if pw.pw_uid != known.uid:
                raise AccountError(
                    f"account {known.account} now has uid {pw.pw_uid}, the registry says {known.uid}: "
                    "someone recreated it; paitient will not hand another uid's files to this user"
                )
            join_workspace_group(site, pw.pw_name)
        else:
            try:
                name = account_name(
                    username,
                    site.accounts.prefix,
                    exists=system_account_exists,
                    owner=_owner(site, registry),
                    reclaimable=lambda n: leftover(site, n, username),
                )
            except NamingError as e:
                raise NoAccountName(str(e)) from None
            made = AccountRecord(site.state_dir).get(name)
            if made is not None and not system_account_exists(name):
                AccountRecord(site.state_dir).drop(name)  # removed by hand since: make it anew
                made = None
            if made is not None and made.role == sysaccounts.USER and made.username == username:
                pw = pwd.getpwnam(name)  # made for this user before a crash kept it out of the registry
                if pw.pw_uid != made.uid:
                    raise AccountError(
                        f"account {name} now has uid {pw.pw_uid}, the record says {made.uid}: someone recreated "
                        f"it; remove it (`userdel {name}`) and its entry from {AccountRecord(site.state_dir).path}"
                    )
            else:
                if system_account_exists(name):
                    _take_over(site, name)
                pw = _create(site, name, username)
        member = Member(
            username=username, account=pw.pw_name, uid=pw.pw_uid, projects=projects, roles=roles, updated=time.time()
        )
        registry.put(member)
        # The project groups follow the registry: this account joins the groups of its projects and
        # leaves the others (paitient.services.data.access).
        access.sync_members(site)
        return member
