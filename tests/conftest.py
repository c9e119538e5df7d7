"""Shared fixtures. Subsystem fixtures live in their own conftest files under tests/<subsystem>/."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def world_tmp():
    """A temporary directory other uids can traverse (pytest's own tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="paitient-test-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
