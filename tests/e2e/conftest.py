"""End-to-end fixtures: one real workspace (directory, proxy, hub, services) shared by the e2e tests."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.e2e.workspace import Workspace


def _root(prefix: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(root, 0o755)  # spawned accounts traverse it to reach their homes and the service sockets
    return root


@pytest.fixture(scope="session")
def workspace():
    root = _root("paitient-e2e-")
    ws = Workspace(root)
    try:
        ws.start()
        yield ws
    finally:
        ws.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fresh_workspace():
    """A workspace of its own, for tests that stop or break parts of it."""
    root = _root("paitient-e2e-own-")
    ws = Workspace(root, prefix="ptu")
    try:
        yield ws
    finally:
        ws.stop()
        shutil.rmtree(root, ignore_errors=True)
