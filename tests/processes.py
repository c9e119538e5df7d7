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


OOM_PROBE = """
def oom_probe():
    import os
    score = int(open("/proc/self/oom_score_adj").read())
    fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
    try:
        os.write(fd, b"0")
        return score, 0
    except OSError as e:
        return score, e.errno
    finally:
        os.close(fd)
"""
"""Source of ``oom_probe()``, for code a test runs in a sandbox: the process's oom_score_adj, and the errno of
its attempt to lower it to 0 (0: it could)."""
