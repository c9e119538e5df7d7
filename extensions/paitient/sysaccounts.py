"""The system accounts a workspace made: recorded, so that they can be removed when nobody wants them.

Every account a workspace creates, a researcher's (role ``user``) or a root-side worker's (``jobs``: the
training runner, ``audit``: the airlock's membership-inference audit), is written to
``<state_dir>/system-accounts.json`` (root:root 0600, replaced atomically under a lock) with its uid, role,
the directory user it serves and its home. The account's comment (GECOS) names the state directory that
made it: ``paitient <role or username> @<state_dir>``. With both, a later workspace tells a leftover (its
state directory is gone, or no longer records it) from an account another live workspace still uses.

Removal ends every process of the account (by uid), deletes the account and its group, and removes its
home only when that home is ``<home_root>/<account>`` and owned by the account: never a path it does not
own. ``paitient accounts prune`` removes what no registry entry or setting wants any more; ``--all``
(uninstall) removes everything the record holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from paitient.config.traits import SHARED_ACCOUNTS
from paitient.fsutil import atomic_write_json, locked

USER = "user"
JOBS = "jobs"
AUDIT = "audit"
ROLES = (USER, JOBS, AUDIT)
WORKER_ROLES = (JOBS, AUDIT)

RECORD_NAME = "system-accounts.json"
CREATE_LOCK = "accounts.create.lock"
"""Held while an account is chosen and made (the hub and the services share it)."""

COMMENT_PREFIX = "paitient "


class SystemAccountError(RuntimeError):
    """An account could not be made, recorded or removed; the message says what to do."""


@dataclass(frozen=True)
class Made:
    """One account this workspace created."""

    account: str
    uid: int
    role: str
    username: str = ""
    """The directory user of a ``user`` account; empty for a worker's."""
    home: str = ""
    created: float = field(default_factory=time.time)


class AccountRecord:
    """``<state_dir>/system-accounts.json``: account name -> :class:`Made`."""

    def __init__(self, state_dir: str | os.PathLike[str]):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / RECORD_NAME
        self.lock_path = self.state_dir / (RECORD_NAME + ".lock")

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise SystemAccountError(
                f"cannot read the record of the workspace's accounts {self.path}: {e}; restore it from a backup "
                "(the accounts it lists are listed in /etc/passwd with the comment 'paitient ... @"
                f"{self.state_dir}')"
            ) from None
        if not isinstance(data, dict):
            raise SystemAccountError(f"{self.path} is not a JSON object; restore it from a backup")
        return data

    def all(self) -> list[Made]:
        return [_made(v) for v in self._read().values()]

    def get(self, account: str) -> Made | None:
        v = self._read().get(account)
        return _made(v) if v else None

    def add(self, made: Made) -> None:
        if made.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {made.role!r}")
        if made.uid == 0:
            raise ValueError(f"{made.account}: uid 0 is root, never an account of the workspace")
        self._change(lambda data: data.__setitem__(made.account, asdict(made)))

    def drop(self, account: str) -> None:
        self._change(lambda data: data.pop(account, None))

    def _change(self, edit: Callable[[dict[str, dict]], object]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with locked(self.lock_path):
            data = self._read()
            edit(data)
            atomic_write_json(self.path, data, mode=0o600)


def _made(v: dict) -> Made:
    return Made(
        account=str(v["account"]),
        uid=int(v["uid"]),
        role=str(v["role"]),
        username=str(v.get("username", "")),
        home=str(v.get("home", "")),
        created=float(v.get("created", 0)),
    )


# -- the comment that names the state directory ------------------------------------------------------------


def comment(label: str, state_dir: str | os.PathLike[str]) -> str:
    """``paitient <label> @<state_dir>``; the state directory is left out when GECOS cannot hold it."""
    label = re.sub(r"[:,\n\r\x00]", "_", label[:64])
    where = str(state_dir)
    if re.search(r"[:,\n\r\x00]", where):
        return f"{COMMENT_PREFIX}{label}"
    return f"{COMMENT_PREFIX}{label} @{where}"


def parse_comment(gecos: str) -> tuple[str, str] | None:
    """``(label, state_dir)`` of a comment :func:`comment` wrote; None for any other (or one without a place)."""
    if not gecos.startswith(COMMENT_PREFIX):
        return None
    label, sep, where = gecos[len(COMMENT_PREFIX) :].rpartition(" @")
    if not sep or not where.startswith("/"):
        return None
    return label, where


def claimed(state_dir: str | os.PathLike[str], account: str, uid: int) -> bool:
    """Whether the workspace of ``state_dir`` still wants ``account`` with that uid (its record or registry
    lists it). A state directory that no longer exists wants nothing."""
    from paitient.registry import Registry

    d = Path(state_dir)
    try:
        made = AccountRecord(d).get(account)
    except SystemAccountError:
        return True  # an unreadable record may well list it: never take it
    if made is not None and made.uid == uid:
        return True
    try:
        member = Registry.for_state_dir(d).by_account(account)
    except (OSError, ValueError):
        return True
    return member is not None and member.uid == uid


# -- making and removing -----------------------------------------------------------------------------------


def processes_of(uid: int) -> list[int]:
    """Process ids whose real, effective, saved or filesystem uid is ``uid`` (zombies, which hold nothing and
    wait only for their parent to reap them, left out)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("State:") and line.split()[1:2] == ["Z"]:
                        break
                    if line.startswith("Uid:"):
                        if str(uid) in line.split()[1:]:
                            pids.append(int(entry))
                        break
        except OSError:
            continue
    return pids


def end_processes(uid: int, timeout: float = 10.0) -> int:
    """Kill every process running as ``uid`` (SIGKILL, again while new ones appear); return how many.
    Raises when some are still there after ``timeout`` seconds."""
    if uid == 0:
        raise SystemAccountError("refusing to end the processes of uid 0 (root)")
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        pids = processes_of(uid)
        if not pids:
            return len(killed)
        if time.monotonic() > deadline:
            raise SystemAccountError(
                f"processes {', '.join(map(str, pids[:10]))} of uid {uid} are still running after {timeout:.0f} s; "
                "end them and try again"
            )
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.05)


def remove_account(account: str, uid: int, *, home_root: str | os.PathLike[str] | None) -> dict[str, object]:
    """End the account's processes, delete the account (and its group), and remove its home when the home is
    ``<home_root>/<account>``, a real directory owned by ``uid``. Returns what was done. The account must
    still have ``uid``: a name someone recreated since is not touched."""
    try:
        pw = pwd.getpwnam(account)
    except KeyError:
        return {"account": account, "uid": uid, "removed": False, "reason": "no such account (already removed)"}
    if pw.pw_uid != uid:
        raise SystemAccountError(
            f"account {account} now has uid {pw.pw_uid}, the record says {uid}: someone recreated it; "
            f"paitient leaves it alone (remove it with `userdel {account}` if it is a leftover)"
        )
    if uid == 0:
        raise SystemAccountError(f"{account} has uid 0; paitient never removes a root account")
    ended = end_processes(uid)
    home = Path(pw.pw_dir)
    deadline = time.monotonic() + 10.0
    while True:
        r = subprocess.run(["userdel", account], capture_output=True, text=True)
        if r.returncode in (0, 6):  # 6: no such user (removed meanwhile)
            break
        if time.monotonic() > deadline:
            raise SystemAccountError(f"userdel {account} failed (exit {r.returncode}): {r.stderr.strip()}")
        end_processes(uid)
        time.sleep(0.2)
    home_removed = False
    if home_root is not None and _own_home(home, account, uid, Path(home_root)):
        shutil.rmtree(home)
        home_removed = True
    return {
        "account": account,
        "uid": uid,
        "removed": True,
        "processes_ended": ended,
        "home": str(home),
        "home_removed": home_removed,
    }


def _own_home(home: Path, account: str, uid: int, home_root: Path) -> bool:
    try:
        st = home.lstat()
    except FileNotFoundError:
        return False
    import stat

    return (
        home.name == account
        and home.parent.resolve() == home_root.resolve()
        and stat.S_ISDIR(st.st_mode)
        and st.st_uid == uid
    )


WORKER_ACCOUNT_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}\Z")


def check_worker_account(name: str, role: str) -> None:
    if name in SHARED_ACCOUNTS:
        raise SystemAccountError(
            f"{name!r} is shared with other software and may not run the {role} worker; use a dedicated account "
            f"such as 'paitient-{role}' (paitient makes it on first use)"
        )
    if not WORKER_ACCOUNT_RE.match(name):
        raise SystemAccountError(
            f"{name!r} is not a usable account name for the {role} worker: 1-32 lower-case letters, digits or '-', "
            "starting with a letter"
        )


def ensure_worker_account(state_dir: str | os.PathLike[str], name: str, role: str) -> pwd.struct_passwd:
    """The dedicated account of a root-side worker (``jobs``, ``audit``): made (system account, own group, no
    home, no shell, no password) and recorded if it does not exist. An existing account of that name is used
    as it is (the operator may have made it); it is never root or a shared account."""
    if role not in WORKER_ROLES:
        raise ValueError(f"worker role must be one of {', '.join(WORKER_ROLES)}, not {role!r}")
    check_worker_account(name, role)
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    with locked(state / CREATE_LOCK):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            argv = [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                comment(role, state),
                name,
            ]
            r = subprocess.run(argv, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemAccountError(
                    f"useradd {name} failed (exit {r.returncode}): {r.stderr.strip()}; make the account by hand "
                    f"(useradd --system --user-group --shell /usr/sbin/nologin {name}) or choose another name"
                ) from None
            pw = pwd.getpwnam(name)
            AccountRecord(state).add(Made(account=name, uid=pw.pw_uid, role=role, home=""))
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        raise SystemAccountError(f"account {name} has uid or gid 0; the {role} worker needs an unprivileged one")
    return pw


# -- what is wanted ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    made: Made
    wanted: bool
    why: str


def review(
    state_dir: str | os.PathLike[str],
    *,
    worker_accounts: dict[str, str],
    everything: bool = False,
    retired: frozenset[str] = frozenset(),
) -> list[Verdict]:
    """Each recorded account and whether the workspace still wants it: a ``user`` account while the registry
    gives it (same uid) to its user; a worker's while the site configuration names it for that role
    (``worker_accounts``: role -> account). ``everything``: nothing is wanted (uninstall); ``retired``: these
    directory users' accounts are not wanted whatever the registry says."""
    from paitient.registry import Registry

    registry = Registry.for_state_dir(Path(state_dir))
    out = []
    for made in sorted(AccountRecord(state_dir).all(), key=lambda m: (m.role, m.account)):
        if everything:
            out.append(Verdict(made, False, "removing everything the workspace made"))
        elif made.role == USER and made.username in retired:
            out.append(Verdict(made, False, f"the operator retires {made.username}"))
        elif made.role == USER:
            member = registry.by_account(made.account)
            if member is not None and member.uid == made.uid:
                out.append(Verdict(made, True, f"the registry gives it to {member.username}"))
            else:
                out.append(Verdict(made, False, "no registry entry has it"))
        elif worker_accounts.get(made.role) == made.account:
            out.append(Verdict(made, True, f"the [{'jobs' if made.role == JOBS else 'airlock'}] settings name it"))
        else:
            out.append(Verdict(made, False, f"the settings no longer name it for {made.role}"))
    return out


def prune(
    state_dir: str | os.PathLike[str],
    *,
    home_root: str | os.PathLike[str],
    worker_accounts: dict[str, str],
    everything: bool = False,
    retired: frozenset[str] = frozenset(),
    dry_run: bool = False,
    report: Callable[[dict[str, object]], None] = lambda outcome: None,
) -> list[dict[str, object]]:
    """Remove the recorded accounts the workspace no longer wants (:func:`review`) and drop them from the
    record. Every outcome (also a failure, which does not stop the others) goes to ``report``."""
    outcomes = []
    state = Path(state_dir)
    with locked(state / CREATE_LOCK):
        for v in review(state, worker_accounts=worker_accounts, everything=everything, retired=retired):
            if v.wanted:
                continue
            base: dict[str, object] = {
                "account": v.made.account,
                "uid": v.made.uid,
                "role": v.made.role,
                "username": v.made.username,
                "why": v.why,
            }
            if dry_run:
                outcome = {**base, "removed": False, "dry_run": True}
            else:
                try:
                    done = remove_account(v.made.account, v.made.uid, home_root=home_root)
                    AccountRecord(state).drop(v.made.account)
                    outcome = {**base, **done}
                except SystemAccountError as e:
                    outcome = {**base, "removed": False, "error": str(e)}
            report(outcome)
            outcomes.append(outcome)
    return outcomes
