"""Local system account names derived from directory usernames: pure functions, no side effects.

A directory name may hold characters a system account cannot (``.``, ``@``, ``_``), two directory names
may map to the same account name, and an account of the same name may already exist on the machine
(``root``, a service, a person's own login). The rules:

- the name is ``<prefix><sanitised username>``: lower-case letters, digits and ``-``, at most 32 characters;
- if that name is taken (by a system account outside paitient's registry, by another paitient user,
  or is reserved), a short hash of the full username is appended; the result is the same every time
  for the same inputs;
- a system account that paitient's registry does not list as this user's is never used.
"""

from __future__ import annotations

import grp
import hashlib
import pwd
import re
from collections.abc import Callable

from paitient.registry import Registry

MAX_LEN = 32
HASH_LEN = 6
ACCOUNT_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}\Z")

RESERVED = frozenset(
    {
        "root",
        "daemon",
        "bin",
        "sys",
        "sync",
        "games",
        "man",
        "lp",
        "mail",
        "news",
        "uucp",
        "proxy",
        "www-data",
        "backup",
        "list",
        "irc",
        "gnats",
        "nobody",
        "nogroup",
        "systemd-network",
        "systemd-resolve",
        "systemd-timesync",
        "messagebus",
        "sshd",
        "_apt",
        "openldap",
        "admin",
        "wheel",
        "sudo",
        "adm",
        "shadow",
        "staff",
        "users",
        "jupyterhub",
        "paitient",
    }
)
"""Never handed out, whether or not such an account exists on this machine."""


class NamingError(ValueError):
    """No account name could be derived; the message says why."""


def sanitise(username: str) -> str:
    """Lower-case; every run of characters outside ``[a-z0-9]`` becomes one ``-``; no ``-`` at the ends."""
    return re.sub(r"[^a-z0-9]+", "-", username.lower(), flags=re.ASCII).strip("-")


def short_hash(username: str, attempt: int = 0) -> str:
    text = username if attempt == 0 else f"{username}\x00{attempt}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:HASH_LEN]


def candidates(username: str, prefix: str, attempts: int = 16) -> list[str]:
    """The names tried for ``username`` in order: the plain one, then ones with a hash suffix."""
    if not ACCOUNT_RE.match(prefix.rstrip("-") or "-"):
        raise NamingError(f"account prefix {prefix!r} must start with a letter and hold only a-z, 0-9, '-'")
    base = sanitise(username)
    out = []
    plain = (prefix + base)[:MAX_LEN].rstrip("-")
    if base and plain == prefix + base:
        out.append(plain)
    room = MAX_LEN - len(prefix) - HASH_LEN - 1
    if room < 0:
        raise NamingError(f"account prefix {prefix!r} is too long to leave room for a name")
    stem = base[:room].rstrip("-")
    for attempt in range(attempts):
        suffix = short_hash(username, attempt)
        out.append(f"{prefix}{stem}-{suffix}" if stem else f"{prefix}{suffix}")
    return out


def account_name(
    username: str,
    prefix: str,
    *,
    exists: Callable[[str], bool],
    owner: Callable[[str], str | None],
    reclaimable: Callable[[str], bool] = lambda name: False,
) -> str:
    """The system account for directory user ``username``.

    ``exists(name)`` says whether a system user or group of that name exists on the machine;
    ``owner(name)`` gives the username paitient's registry records for that account (None if none).
    A name that the registry gives to this user is reused even though it exists on the machine;
    ``reclaimable(name)`` says whether an existing account of that name is a leftover of an earlier workspace
    that the caller will take over (remove and make anew), so that the name is not lost.
    """
    if not username:
        raise NamingError("empty username")
    for name in candidates(username, prefix):
        if name in RESERVED or not ACCOUNT_RE.match(name):
            continue
        recorded = owner(name)
        if recorded == username:
            return name
        if recorded is not None or (exists(name) and not reclaimable(name)):
            continue
        return name
    raise NamingError(
        f"no free account name for {username[:40]!r} with prefix {prefix!r}: every candidate "
        f"({', '.join(candidates(username, prefix)[:3])}, ...) is taken by an account this workspace does not own; "
        "remove the leftovers (`paitient accounts prune --all` in the state directory that made them, or "
        "`userdel --remove NAME` for accounts no state directory records) or choose another [accounts] prefix"
    )


def system_account_exists(name: str) -> bool:
    """True when a user or a group of this name exists (``useradd`` would fail or reuse it)."""
    for lookup in (pwd.getpwnam, grp.getgrnam):
        try:
            lookup(name)
            return True
        except KeyError:
            pass
    return False


def registry_owner(registry: Registry) -> Callable[[str], str | None]:
    """``owner`` for :func:`account_name` backed by paitient's registry of accounts."""

    def owner(name: str) -> str | None:
        member = registry.by_account(name)
        return member.username if member is not None else None

    return owner
