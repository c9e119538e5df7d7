"""The filesystem primitives: whole files or none, and a file made once is never replaced."""

from __future__ import annotations

import os
import stat

from paitient.fsutil import atomic_write_bytes, create_once


def test_create_once_makes_the_file_whole_with_its_mode_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "key"
    assert create_once(path, b"first secret") is True
    assert path.read_bytes() == b"first secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["key"]


def test_create_once_never_replaces_a_file_that_is_there(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(b"made meanwhile")
    assert create_once(path, b"second secret") is False
    assert path.read_bytes() == b"made meanwhile"
    assert os.listdir(tmp_path) == ["key"]


def test_atomic_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "manifest.json"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new", mode=0o640)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["manifest.json"]
