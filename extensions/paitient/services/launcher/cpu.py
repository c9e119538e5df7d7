"""CPU shared per account: each account's kernels in a cpu control group of their own, all of one weight.

Without it the scheduler shares the CPU between sessions (each kernel's sandbox is one, its autogroup), and a
kernel makes more of them with ``setsid``: ten spinning kernels of one account took most of two cores from
everyone else. In a cpu group, a process's session no longer matters (the kernel applies autogroups to the
root group's processes only), so an account gets one share however many kernels, processes or sessions it
runs, and uses the whole machine while nobody else asks for it.

The groups are root's: ``<cpu hierarchy>/paitient-kernels/<account>``, each of the default weight (cgroup v2
``cpu.weight`` 100, v1 ``cpu.shares`` 1024), beside the host's own top-level groups. ``paitient-kernels``
itself weighs as one of them, so however busy the kernels are the hub and the services keep their part.
The launcher moves a kernel's keeper into its account's group before the keeper starts anything (the keeper
waits for it on its stdin, :mod:`.keeper`); everything the kernel starts stays in the group. The server that
asked for the kernel and root's pump of its output go there too: the work a kernel makes them do is its
account's. A kernel cannot leave the group: its sandbox has no cgroup file system, and outside the sandbox only
root may write a group's ``cgroup.procs``. A group is removed once nothing is left in it (looked at when a
kernel ends and when the launcher starts, :meth:`CpuGroups.sweep`).

Where no cpu hierarchy is writable (a launcher in a container that does not own its cgroups, the
``paitient install`` unit without its cgroup access), :func:`find` gives None, the launcher warns once, and
kernels are shared per session as before.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from pathlib import Path

GROUP = "paitient-kernels"
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CpuGroups:
    """The account groups under ``base`` (``<hierarchy>/paitient-kernels``) of cgroup ``version`` 1 or 2."""

    base: Path
    version: int

    def group(self, account: str) -> Path:
        if not account or "/" in account or account.startswith("."):
            raise ValueError(f"not an account name: {account!r}")
        return self.base / account

    def place(self, pid: int, account: str) -> Path:
        """Move process ``pid`` (and the threads it has) into ``account``'s group, made as needed (again, where
        a :meth:`sweep` removed it between the two steps)."""
        group = self.group(account)
        for _ in range(3):
            try:
                group.mkdir(mode=0o755, exist_ok=True)
            except FileExistsError:  # not a folder: nothing here makes one
                raise OSError(errno.EEXIST, f"{group} is not a cgroup") from None
            try:
                (group / "cgroup.procs").write_text(f"{pid}\n")
            except FileNotFoundError:
                continue
            return group
        raise OSError(errno.ENOENT, f"{group} went away as it was made, three times")

    def members(self, account: str) -> list[int]:
        """The processes in ``account``'s group (none when it has none)."""
        try:
            text = (self.group(account) / "cgroup.procs").read_text()
        except FileNotFoundError:
            return []
        return [int(p) for p in text.split()]

    def release(self, account: str) -> bool:
        """Remove ``account``'s group if no process is left in it; whether it is gone."""
        try:
            self.group(account).rmdir()
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno in (errno.EBUSY, errno.ENOTEMPTY):
                return False
            raise
        return True

    def sweep(self) -> list[str]:
        """Remove every account's group that holds no process (one whose server ended after its kernels, or
        that a launcher which has since restarted made); the names removed."""
        removed: list[str] = []
        try:
            names = [e.name for e in os.scandir(self.base) if e.is_dir(follow_symlinks=False)]
        except OSError:
            return removed
        for name in names:
            with contextlib.suppress(OSError, ValueError):
                if self.release(name):
                    removed.append(name)
        return removed


def _v2_cpu(root: Path) -> bool:
    with contextlib.suppress(OSError):
        return "cpu" in (root / "cgroup.controllers").read_text().split()
    return False


def _v1_cpu_mount(mountinfo: str) -> Path | None:
    """Where the cgroup v1 hierarchy with the cpu controller is mounted, from ``/proc/self/mountinfo``."""
    for line in mountinfo.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        if fields[sep + 1] == "cgroup" and "cpu" in fields[sep + 3].split(","):
            return Path(fields[4])
    return None


def _writable(base: Path, version: int) -> CpuGroups | None:
    """The groups under ``base``, made and their controller handed down; None where root may not."""
    try:
        if version == 2:
            # the parent hands the cpu controller to its children (the root group is exempt from the rule that
            # a group with processes may not)
            (base.parent / "cgroup.subtree_control").write_text("+cpu\n")
        base.mkdir(mode=0o755, exist_ok=True)
        if version == 2:
            (base / "cgroup.subtree_control").write_text("+cpu\n")
        probe = os.open(base / "cgroup.procs", os.O_WRONLY)
        os.close(probe)
    except OSError:
        return None
    return CpuGroups(base, version)


def find(cgroup_root: Path = CGROUP_ROOT, mountinfo: str | None = None) -> CpuGroups | None:
    """The account groups of this host: cgroup v2 where its root offers the cpu controller, else the v1 cpu
    hierarchy; None where neither can be written."""
    if _v2_cpu(cgroup_root):
        return _writable(cgroup_root / GROUP, 2)
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    mount = _v1_cpu_mount(mountinfo)
    return None if mount is None else _writable(mount / GROUP, 1)
