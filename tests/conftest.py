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


def _free_name(prefix: str) -> str:
    import pwd
    import secrets

    while True:
        name = f"{prefix}{secrets.token_hex(3)}"
        try:
            pwd.getpwnam(name)
        except KeyError:
            return name


@pytest.fixture
def make_system_user(world_tmp):
    """Create real system accounts (name ``ptt<hex>``, home 0700 under a world-traversable tmp dir).

    Returns a factory ``make(label) -> pwd.struct_passwd``; every account it made is removed afterwards.
    """
    import pwd
    import subprocess

    made: list[str] = []
    homes = world_tmp / "homes"
    homes.mkdir(mode=0o755)

    def make(label: str = "user"):
        name = _free_name("ptt")
        home = homes / name
        subprocess.run(
            ["useradd", "--system", "--no-user-group", "--gid", "nogroup", "--home-dir", str(home),
             "--create-home", "--shell", "/usr/sbin/nologin", "--comment", f"paitient test {label}", name],
            check=True, capture_output=True,
        )
        made.append(name)
        os.chmod(home, 0o700)
        return pwd.getpwnam(name)

    yield make
    for name in made:
        subprocess.run(["userdel", "--remove", name], capture_output=True)
