"""Root-only secret files: created once, whole, in private folders; refused when anyone else could read them."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from paitient.config import ConfigError, check_owner
from paitient.fsutil import create_once


def private_dirs(base: Path, path: Path) -> None:
    """Create ``path`` and every folder between it and ``base`` as root 0700."""
    parts = path.relative_to(base).parts
    for i in range(1, len(parts) + 1):
        d = base.joinpath(*parts[:i])
        d.mkdir(mode=0o700, parents=i == 1, exist_ok=True)
        os.chmod(d, 0o700)


def create_secret(base: Path, path: Path, nbytes: int) -> bool:
    """``nbytes`` random bytes at ``path`` (root 0600, its folders up to ``base`` 0700) unless a file is
    there; never replaces one made meanwhile. Returns whether this call made it."""
    if path.exists():
        return False
    private_dirs(base, path.parent)
    return create_once(path, secrets.token_bytes(nbytes))


def read_secret(path: Path, *, min_bytes: int, what: str, remedy: str) -> bytes:
    """The bytes of the secret file ``path``; raises :class:`ConfigError` saying what is wrong and what to
    do (``remedy``) for a missing, linked, short, non-root or group/world-accessible file."""
    if not path.is_file() or path.is_symlink():
        raise ConfigError(f"no {what} at {path} (or not a regular file); {remedy}")
    check_owner(path.parent)
    check_owner(path, secret=True)
    data = path.read_bytes()
    if len(data) < min_bytes:
        raise ConfigError(f"the {what} at {path} holds {len(data)} bytes, not {min_bytes}; {remedy}")
    return data
