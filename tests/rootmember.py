"""Tests whose in-process clients run as root stand the test process in for a researcher.

The registry's writer refuses uid 0 (no workspace member is root), so these tests write the entry
themselves, as a hand-edited file would be; the services read it like any other.
"""

from __future__ import annotations

from dataclasses import asdict

from paitient.fsutil import atomic_write_json, locked
from paitient.registry import Member, Registry


def put(registry: Registry, member: Member) -> None:
    """``registry.put(member)``, also for ``member.uid == 0``."""
    registry.path.parent.mkdir(parents=True, exist_ok=True)
    with locked(registry.lock_path):
        data = registry._read()
        data[member.username] = asdict(member)
        atomic_write_json(registry.path, data, mode=0o644)
