"""Removing the system accounts a test made: the one way every fixture and helper does it.

``userdel --remove`` refuses while a process of the account still runs (a kernel's keeper ending a moment
after its server), so it is tried again; after half the time the account's remaining processes, which only
the test's own code started, are killed. An account that cannot be removed fails the test (:func:`remove_all`)
instead of being left for the next run to trip over.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterable


def remove(name: str, timeout: float = 15.0) -> bool:
    """``userdel --remove NAME`` of a test's own account, retried; True once it is gone (or never existed)."""
    deadline = time.monotonic() + timeout
    killed = False
    while True:
        r = subprocess.run(["userdel", "--remove", name], capture_output=True, text=True)
        if r.returncode == 0 or "does not exist" in r.stderr:
            return True
        if time.monotonic() >= deadline:
            return False
        if not killed and time.monotonic() >= deadline - timeout / 2:
            subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)
            killed = True
        time.sleep(0.25)


def remove_all(names: Iterable[str], timeout: float = 15.0) -> None:
    """:func:`remove` each of ``names``; fails (AssertionError) naming those that are still there."""
    left = [name for name in names if not remove(name, timeout)]
    assert not left, f"test accounts could not be removed: {left}"
