"""One test session (or benchmark that makes a workspace) at a time on a machine.

Sessions share system state: the workspace's group, which a session removes at its end when it made it,
and projects' groups, which each test removes when they are new after it. Two sessions at once would
remove each other's groups mid-test; they queue instead.
"""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import IO

SESSION_LOCK = Path("/tmp/paitient-tests.lock")  # noqa: S108 - root's tests only; a lock, no content
_held: list[IO[str]] = []


def acquire() -> None:
    """Wait until no other session holds the lock, then hold it until this process ends."""
    if _held:
        return
    lock = open(SESSION_LOCK, "a")  # noqa: SIM115 - held for the whole session
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"\npaitient tests: another test session holds {SESSION_LOCK}; waiting for it to end", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
    _held.append(lock)
