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


def test_a_folder_handed_over_is_a_real_folder_whatever_stood_at_its_name(tmp_path):
    """A link to a folder, a file and a FIFO at the name are replaced by a folder of the uid, with the mode;
    the link's target keeps its owner and mode, and a folder already there keeps what is in it."""
    from paitient.fsutil import hand_over_folder, open_folder

    target = tmp_path / "target"
    target.mkdir(mode=0o755)
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "inside").write_text("y")
    with open_folder(tmp_path) as parent:
        for name in ("link", "file", "fifo", "kept", "new"):
            fd = hand_over_folder(parent, name, 65534, 65534, 0o700)
            os.close(fd)
            st = os.lstat(tmp_path / name)
            assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700, (name, oct(st.st_mode))
            assert (st.st_uid, st.st_gid) == (65534, 65534), name
    assert (tmp_path / "kept" / "inside").read_text() == "y"
    st = target.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)


def test_open_folder_refuses_a_link(tmp_path):
    import errno

    import pytest

    from paitient.fsutil import open_folder

    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(OSError) as e, open_folder(tmp_path / "link"):
        pass
    assert e.value.errno in (errno.ELOOP, errno.ENOTDIR)  # Linux answers ENOTDIR with O_DIRECTORY
