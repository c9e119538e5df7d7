"""Small filesystem primitives every part uses: atomic publication and locked read-modify-write."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part.

    The bytes go to a temporary file in the same directory, are fsync'd, get their mode, and are renamed
    over the target; the directory is fsync'd so the rename survives a crash.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def create_once(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> bool:
    """Create ``path`` whole with ``data`` unless it exists; never replace a file made meanwhile.

    The bytes are written and fsync'd in a temporary file that is then hard-linked into place (which fails
    when the name is taken), so a crash leaves no file or the whole one. Returns whether this call made it.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(path.parent)
    return True


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, mode: int = 0o644) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode)


_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def hand_over_folder(parent: int, name: str, uid: int, gid: int, mode: int = 0o700) -> int:
    """Make ``name``, in the folder open as ``parent``, a folder of ``uid``:``gid`` with ``mode``, and return it
    open (the caller closes it). Root calls this in a folder an account can write: a chmod and chown by path
    would follow a link the account put there, and hand it whatever folder the link names (``/etc``).

    Nothing here follows a link: the folder is opened with ``O_NOFOLLOW`` and changed through its descriptor.
    Whatever else stands at ``name`` (a link, a file, a FIFO) was put there by the folder's account and is
    replaced by a new folder. If something takes its place again at once, this raises :class:`OSError`."""
    for attempt in (1, 2):
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, mode, dir_fd=parent)
        try:
            fd = os.open(name, _FOLDER_FLAGS, dir_fd=parent)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR) or attempt == 2:
                raise OSError(
                    e.errno, f"{name} is not a folder and could not be made one ({e.strerror}): remove it", name
                ) from e
            os.unlink(name, dir_fd=parent)
            continue
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise AssertionError("unreachable")


@contextlib.contextmanager
def open_folder(path: str | os.PathLike[str]) -> Iterator[int]:
    """``path``, a folder, open for the ``dir_fd`` of other calls; its last part must not be a link."""
    fd = os.open(path, _FOLDER_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(lock_path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if missing) for the duration."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
