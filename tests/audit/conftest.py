"""Fixtures for the audit tests: a trail in a private temp dir, and a site whose state dir other uids reach."""

import pytest

from paitient.config import load
from paitient.services.audit.writer import AuditLog


@pytest.fixture
def trail(tmp_path):
    return AuditLog(tmp_path / "audit", rotate_bytes=1 << 20)


@pytest.fixture
def site(world_tmp):
    return load(None, overrides={"workspace": {"state_dir": str(world_tmp / "state")}})


def _fill(log: AuditLog, n: int, actor: str = "alice") -> list[dict]:
    return [
        log.append(actor=actor, action="cell.execute", object=f"k{i}", details={"code": f"x = {i}"}) for i in range(n)
    ]


@pytest.fixture
def fill():
    """fill(log, n): append n cell.execute records by alice."""
    return _fill
