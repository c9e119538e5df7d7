"""Who may read a project's published data: one system group per project, holding exactly its members' accounts.

    <data_root>                          root:root         0711  (passable, not listable)
    <data_root>/<project>/...            root:<group>      directories 0750, files 0440
    <data_root>/<unknown name>/...       root:root         0700  (a project the site does not name)

The group of a project is :func:`group_name`: the accounts' prefix, ``proj-`` and the project's name
(``pt-proj-<project>`` by default; a name longer than the 32 characters a group name may have is shortened and
given a hash of the whole name). The workspace creates it (``groupadd
--system``) and records it in ``<state_dir>/project-groups.json`` (root, 0644); a group of that name that the
record does not show as this project's is refused, so a group someone else made never receives data.

Members are the registry's accounts whose projects include the project, set as a whole (``gpasswd -M``), so
an account that left the project leaves the group. The hub keeps it in step whenever it writes the registry
(:func:`paitient.hub.accounts.ensure_account`, at every server start), publication when it creates a project's
folder, and ``paitient up`` (:func:`sync`) for everything at start, including the modes of data published
before. A running process keeps the groups it started with: a member removed from a project loses the
data at their next server start (the registry changes then too).

The pseudonymisation key and the row-detection indexes are not here: they live under the state directory,
root 0600 in root 0700 folders (:mod:`paitient.services.data.keys`, :mod:`paitient.services.data.rowindex`).
"""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Collection, Iterable
from pathlib import Path

from paitient.config import SiteConfig
from paitient.fsutil import atomic_write_json, locked
from paitient.registry import Registry

MAX_GROUP_NAME = 32
DIR_MODE = 0o750
FILE_MODE = 0o440
ROOT_MODE = 0o711
RECORD = "project-groups.json"


class AccessError(RuntimeError):
    """A project's group cannot be made or used; the message says what to do."""


def _tool(name: str) -> str:
    """The shadow-utils program ``name`` (``groupadd``, ``gpasswd``), also where PATH lacks /usr/sbin."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise AccessError(f"{name} not found; install the system's shadow utilities (passwd package)")
    return found


def _candidate(site: SiteConfig, project: str, salt: str = "") -> str:
    """``<prefix>proj-<project>`` (``-<salt>`` added), shortened with a hash to at most 32 characters."""
    prefix = site.accounts.prefix + "proj-"
    name = prefix + project + (f"-{salt}" if salt else "")
    if len(name) <= MAX_GROUP_NAME:
        return name
    digest = hashlib.sha256(f"{project}/{salt}".encode()).hexdigest()[:8]
    return f"{prefix}{project[: MAX_GROUP_NAME - len(prefix) - 9]}-{digest}"


def group_name(site: SiteConfig, project: str) -> str:
    """The system group whose members may read ``project``'s data (at most 32 characters): the one this
    workspace recorded, else ``<prefix>proj-<project>``."""
    for name, entry in _read_record(Path(site.state_dir)).items():
        if entry.get("project") == project:
            return name
    return _candidate(site, project)


def _record_path(state_dir: Path) -> Path:
    return Path(state_dir) / RECORD


def _read_record(state_dir: Path) -> dict[str, dict]:
    try:
        return json.loads(_record_path(state_dir).read_text())
    except FileNotFoundError:
        return {}


def ensure_group(site: SiteConfig, project: str) -> int:
    """The gid of ``project``'s group, created (and recorded) if there is none yet. A group of the plain name
    that another live workspace (with the same accounts prefix) uses is left alone: this workspace's group
    then carries a suffix of its own."""
    state_dir = Path(site.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    with locked(state_dir / (RECORD + ".lock")):
        record = _read_record(state_dir)
        name = group_name(site, project)
        if name not in record and _taken(name, state_dir):
            name = _candidate(site, project, hashlib.sha256(str(state_dir).encode()).hexdigest()[:6])
        mine = record.get(name)
        try:
            existing = grp.getgrnam(name)
        except KeyError:
            existing = None
        if existing is not None:
            if mine is None and _leftover(existing, state_dir):
                # an earlier workspace's group whose members no live workspace wants: this one takes it over
                # (its members are set from this registry at the next sync)
                record[name] = {"project": project, "gid": existing.gr_gid, "taken_over": True}
                atomic_write_json(_record_path(state_dir), record, mode=0o644)
                return existing.gr_gid
            if mine is None or mine.get("project") != project or int(mine.get("gid", -1)) != existing.gr_gid:
                raise AccessError(
                    f"a group {name!r} (gid {existing.gr_gid}) exists that paitient did not create for project "
                    f"{project!r} (see {_record_path(state_dir)}); remove or rename that group, then start again"
                )
            return existing.gr_gid
        if mine is not None:
            raise AccessError(
                f"the group {name!r} of project {project!r} (gid {mine.get('gid')}) was removed from the system; "
                f"recreate it with that gid (groupadd --system --gid {mine.get('gid')} {name}) or remove its entry "
                f"from {_record_path(state_dir)}"
            )
        r = subprocess.run([_tool("groupadd"), "--system", name], capture_output=True, text=True)
        if r.returncode != 0:
            raise AccessError(f"groupadd {name} failed (exit {r.returncode}): {r.stderr.strip()}")
        gid = grp.getgrnam(name).gr_gid
        record[name] = {"project": project, "gid": gid}
        atomic_write_json(_record_path(state_dir), record, mode=0o644)
        return gid


def _taken(name: str, state_dir: Path) -> bool:
    """Whether a group ``name`` exists that is not a leftover this workspace may take over."""
    try:
        existing = grp.getgrnam(name)
    except KeyError:
        return False
    return not _leftover(existing, state_dir)


def _leftover(group: grp.struct_group, state_dir: Path) -> bool:
    """Whether ``group`` is a project group an earlier workspace left behind: every member an account a
    paitient workspace made (its comment says so) that no other live workspace still wants."""
    from paitient import sysaccounts

    for account in group.gr_mem:
        try:
            pw = pwd.getpwnam(account)
        except KeyError:
            continue
        parsed = sysaccounts.parse_comment(pw.pw_gecos)
        if parsed is None:
            return False  # someone else's account is in it: not ours to take
        where = Path(parsed[1])
        if where != Path(state_dir) and sysaccounts.claimed(where, account, pw.pw_uid):
            return False
    return True


def set_members(site: SiteConfig, project: str, accounts: Iterable[str]) -> None:
    """Make the members of ``project``'s group exactly ``accounts`` (existing system accounts only)."""
    name = group_name(site, project)
    wanted = sorted({a for a in accounts if _account_exists(a)})
    if sorted(grp.getgrnam(name).gr_mem) == wanted:
        return
    r = subprocess.run([_tool("gpasswd"), "-M", ",".join(wanted), name], capture_output=True, text=True)
    if r.returncode != 0:
        raise AccessError(f"gpasswd -M on {name} failed (exit {r.returncode}): {r.stderr.strip()}")


def _account_exists(account: str) -> bool:
    try:
        pwd.getpwnam(account)
    except KeyError:
        return False
    return True


def members_by_project(registry: Registry, projects: Iterable[str]) -> dict[str, list[str]]:
    """Project -> the registry's accounts of its members."""
    out: dict[str, list[str]] = {p: [] for p in projects}
    for m in registry.all():
        for p in m.projects:
            if p in out:
                out[p].append(m.account)
    return out


def sync_members(site: SiteConfig) -> None:
    """Every project's group created if missing and its members set from the registry."""
    names = [p.name for p in site.projects]
    by_project = members_by_project(Registry.for_state_dir(site.state_dir), names)
    for project in names:
        ensure_group(site, project)
        set_members(site, project, by_project[project])


def remove_groups(site: SiteConfig, *, dry_run: bool = False, leaving: Collection[str] = ()) -> list[str]:
    """Delete the project groups this workspace made (:data:`RECORD`), for ``paitient uninstall`` once the
    accounts are gone; returns what was (or, ``dry_run``, would be) done, a line each.

    A project's published data is made root-only first (root:root, directories 0700, files 0400): a group
    made later that is given the same gid would otherwise read it. ``paitient up`` gives it back to a new
    group of the project. A group that still has members (an account the workspace did not make, or one it
    could not remove) stays, and so does its data's access; a group whose gid is no longer the recorded one
    is someone else's now and is not touched. ``leaving``: accounts counted as gone already (a dry run's,
    before the accounts are removed)."""
    state_dir = Path(site.state_dir)
    done: list[str] = []
    with locked(state_dir / (RECORD + ".lock")):
        record = _read_record(state_dir)
        for name, entry in sorted(record.items()):
            project, gid = str(entry.get("project", "")), int(entry.get("gid", -1))
            try:
                group = grp.getgrgid(gid)
            except KeyError:
                group = None
            if group is None or group.gr_name != name:
                done.append(f"group {name} of project {project} is gone already (gid {gid})")
                if not dry_run:
                    del record[name]
                    atomic_write_json(_record_path(state_dir), record, mode=0o644)
                continue
            if members := sorted(set(group.gr_mem) - set(leaving)):
                done.append(f"kept group {name} of project {project}: it still has members ({', '.join(members)})")
                continue
            folder = Path(site.data_root) / project
            if folder.is_dir() and not dry_run:
                protect(folder, 0, dir_mode=0o700, file_mode=0o400)
            if not dry_run:
                r = subprocess.run([_tool("groupdel"), name], capture_output=True, text=True)
                if r.returncode != 0:
                    raise AccessError(f"groupdel {name} failed (exit {r.returncode}): {r.stderr.strip()}")
                del record[name]
                atomic_write_json(_record_path(state_dir), record, mode=0o644)
            line = f"{'would remove' if dry_run else 'removed'} group {name} (gid {gid}) of project {project}"
            if folder.is_dir():
                line += f"; its data {folder} {'would be made' if dry_run else 'made'} root-only"
            done.append(line)
    return done


def protect_root(data_root: Path) -> None:
    """The data root: root's, passable by everyone (members reach their project) and listable by none."""
    data_root.mkdir(mode=ROOT_MODE, parents=True, exist_ok=True)
    os.chown(data_root, 0, 0)
    os.chmod(data_root, ROOT_MODE)


def protect(path: Path, gid: int, dir_mode: int = DIR_MODE, file_mode: int = FILE_MODE) -> None:
    """Everything under ``path`` (itself included) made root:``gid``, directories ``dir_mode``, files
    ``file_mode``; links are re-owned, never followed."""
    for top, dirs, files in os.walk(path, followlinks=False):
        _own(Path(top), gid, dir_mode, file_mode)
        for name in [*dirs, *files]:
            _own(Path(top) / name, gid, dir_mode, file_mode)


def _own(path: Path, gid: int, dir_mode: int, file_mode: int) -> None:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        os.chown(path, 0, gid, follow_symlinks=False)
        return
    os.chown(path, 0, gid)
    os.chmod(path, dir_mode if stat.S_ISDIR(st.st_mode) else file_mode)


def project_gid(site: SiteConfig, project: str) -> int:
    """``project``'s group made if missing and its members set from the registry; its gid."""
    gid = ensure_group(site, project)
    set_members(site, project, members_by_project(Registry.for_state_dir(site.state_dir), [project])[project])
    return gid


def protect_project(site: SiteConfig, project: str) -> int:
    """``project``'s group made and its members set; its data folder (if any) given to the group. Returns the gid."""
    gid = project_gid(site, project)
    folder = Path(site.data_root) / project
    if folder.exists():
        protect(folder, gid)
    return gid


def sync(site: SiteConfig) -> list[str]:
    """At start: groups and members of every project, the data root's and every project folder's owners and
    modes; a folder under the data root that names no project of the site becomes root-only. Returns the
    names of the folders made root-only."""
    data_root = Path(site.data_root)
    protect_root(data_root)
    sync_members(site)
    known = {p.name for p in site.projects}
    orphans: list[str] = []
    for entry in sorted(data_root.iterdir()):
        if entry.is_symlink() or not entry.is_dir():
            continue
        if entry.name in known:
            protect(entry, grp.getgrnam(group_name(site, entry.name)).gr_gid)
        else:
            protect(entry, 0, 0o700, 0o400)
            orphans.append(entry.name)
    return orphans
