"""The pseudonymisation key: created root-only, and refused whenever it is not."""

import os
import stat

import pytest

from paitient.config import load
from paitient.services.data import keys
from paitient.services.data.keys import KeyRefused


@pytest.fixture
def bare_site(tmp_path):
    return load(None, overrides={"workspace": {"state_dir": str(tmp_path / "state")}})


def test_ensure_key_creates_32_random_root_only_bytes_once(bare_site):
    path = keys.ensure_key(bare_site)
    st = path.stat()
    assert path == bare_site.key_file and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    key = path.read_bytes()
    assert len(key) == 32 and key != b"\0" * 32
    keys.ensure_key(bare_site)
    assert path.read_bytes() == key  # never replaced
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temp files left


def test_missing_key_is_refused_with_what_to_do(bare_site):
    with pytest.raises(KeyRefused, match=r"no pseudonymisation key at .*paitient ingest --init-key"):
        keys.load_master_key(bare_site)


@pytest.mark.parametrize(
    "mode, message",
    [
        (0o640, "readable by group or others"),
        (0o604, "readable by group or others"),
        (0o620, "writable by group or others"),
    ],
)
def test_group_or_world_access_is_refused(bare_site, mode, message):
    path = keys.ensure_key(bare_site)
    os.chmod(path, mode)
    with pytest.raises(KeyRefused, match=message):
        keys.load_master_key(bare_site)


def test_key_owned_by_another_user_is_refused(bare_site):
    path = keys.ensure_key(bare_site)
    os.chown(path, 65534, 65534)
    with pytest.raises(KeyRefused, match="must be owned by root"):
        keys.load_master_key(bare_site)


def test_key_in_a_folder_others_can_write_is_refused(bare_site):
    path = keys.ensure_key(bare_site)
    os.chmod(path.parent, 0o777)
    with pytest.raises(KeyRefused, match="writable by group or others"):
        keys.load_master_key(bare_site)


def test_short_key_and_symlinked_key_are_refused(bare_site, tmp_path):
    path = keys.ensure_key(bare_site)
    path.write_bytes(b"short")
    with pytest.raises(KeyRefused, match="holds 5 bytes; it needs at least 32"):
        keys.load_master_key(bare_site)
    real = tmp_path / "real.key"
    real.write_bytes(os.urandom(32))
    os.chmod(real, 0o600)
    path.unlink()
    path.symlink_to(real)
    with pytest.raises(KeyRefused, match="must be a regular file"):
        keys.load_master_key(bare_site)


def test_project_keys_are_separate_and_fingerprinted():
    a, b = keys.project_key(b"m" * 32, "oncology"), keys.project_key(b"m" * 32, "cardiometabolic")
    assert a != b and len(a) == 32
    assert keys.key_id(a) != keys.key_id(b) and len(keys.key_id(a)) == 12
    assert keys.project_key(b"n" * 32, "oncology") != a
