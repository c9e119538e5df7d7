"""What the tests read of this machine's processes: whose they are, and how much memory the test's own took."""

from __future__ import annotations

import os


def processes_of(uid: int) -> list[int]:
    """The pids of the processes whose real uid is ``uid``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                uids = next(line for line in f if line.startswith("Uid:")).split()
        except (OSError, StopIteration):
            continue
        if int(uids[1]) == uid:
            found.append(int(pid))
    return found


def reset_peak_memory() -> int:
    """Start this process's peak resident size again from the present one; the present one, in KiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak_memory()


def peak_memory() -> int:
    """This process's peak resident size since :func:`reset_peak_memory`, in KiB."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1])
