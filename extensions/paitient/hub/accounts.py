"""System accounts for signed-in users: created on first sign-in, recorded in the registry, never reused.

Each directory user gets one local account (``<prefix><name>``, see :mod:`paitient.hub.naming`), with its
own group and a private home (0700) under ``[accounts] home_root``. The registry ties the account to the
directory user and records the user's projects and roles as of the latest sign-in; the services read it
to know who is calling them.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import time
from pathlib import Path

from paitient.config import SiteConfig
from paitient.fsutil import locked
from paitient.hub.naming import account_name, registry_owner, system_account_exists
from paitient.registry import Member, Registry
from paitient.services.data import access


class AccountError(RuntimeError):
    """An account could not be created or does not match the registry; the message says what to do."""


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
        "--comment",
        f"paitient {username[:64]}",
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
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise AccountError(f"useradd {name} failed (exit {r.returncode}): {r.stderr.strip()}")
    pw = pwd.getpwnam(name)
    os.chmod(pw.pw_dir, 0o700)
    return pw


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
        else:
            name = account_name(
                username, site.accounts.prefix, exists=system_account_exists, owner=registry_owner(registry)
            )
            pw = _create(site, name, username)
        member = Member(
            username=username, account=pw.pw_name, uid=pw.pw_uid, projects=projects, roles=roles, updated=time.time()
        )
        registry.put(member)
        # The project groups follow the registry: this account joins the groups of its projects and
        # leaves the others (paitient.services.data.access).
        access.sync_members(site)
        return member
