"""The example notebooks: shipped inside the package, added to a home as the account's own files, never
replacing what is there, and never written through anything the user prepared in their home."""

import os
import pwd
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from paitient.hub import examples
from paitient.hub.examples import ExamplesError, provide, shipped

REPO = Path(__file__).resolve().parents[2]
NOBODY = pwd.getpwnam("nobody")
SOURCE = REPO / "extensions" / "paitient" / "examples"


@pytest.fixture
def home(tmp_path) -> Path:
    """A home owned by the unprivileged `nobody` account, private like the workspace's homes."""
    path = tmp_path / "home"
    path.mkdir(mode=0o700)
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    return path


def test_the_package_ships_every_notebook_and_the_readme():
    files = shipped()
    assert set(files) == {p.name for p in SOURCE.iterdir() if p.suffix in (".ipynb", ".md")}
    assert "README.md" in files and len([n for n in files if n.endswith(".ipynb")]) == 4
    for name, data in files.items():
        assert data == (SOURCE / name).read_bytes()


def test_a_new_home_gets_every_example_as_the_accounts_own_private_file(home):
    added = provide(home, NOBODY.pw_uid, NOBODY.pw_gid)
    assert added == sorted(shipped())
    assert sorted(os.listdir(home)) == added  # no temporary file left behind
    for name, data in shipped().items():
        st = os.lstat(home / name)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert (st.st_uid, st.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
        assert (home / name).read_bytes() == data
    assert provide(home, NOBODY.pw_uid, NOBODY.pw_gid) == []


def test_what_the_user_has_under_an_examples_name_is_never_touched(home, tmp_path):
    names = sorted(shipped())
    edited, linked, folder = names[0], names[1], names[2]
    (home / edited).write_text("my own notes")
    target = tmp_path / "root-only"
    target.write_text("root's file")
    (home / linked).symlink_to(target)  # a link planted to make root write elsewhere
    (home / folder).mkdir()
    added = provide(home, NOBODY.pw_uid, NOBODY.pw_gid)
    assert added == names[3:]
    assert (home / edited).read_text() == "my own notes"
    assert os.readlink(home / linked) == str(target) and target.read_text() == "root's file"
    assert target.stat().st_uid == 0
    assert (home / folder).is_dir() and os.listdir(home / folder) == []
    # deleted later: the next start brings it back, and only it
    os.unlink(home / names[3])
    assert provide(home, NOBODY.pw_uid, NOBODY.pw_gid) == [names[3]]


def test_a_name_taken_between_the_check_and_the_publication_is_not_replaced(home, monkeypatch):
    # the last step only links a fresh file to a free name: when the user wins the race, theirs stays
    name = sorted(shipped())[0]
    (home / name).write_text("raced in")
    monkeypatch.setattr(examples, "_taken", lambda dir_fd, n: False)
    assert provide(home, NOBODY.pw_uid, NOBODY.pw_gid, {name: b"example"}) == []
    assert (home / name).read_text() == "raced in" and os.listdir(home) == [name]


def test_a_home_that_is_not_the_accounts_is_refused(home, tmp_path):
    os.chown(home, 0, 0)
    with pytest.raises(ExamplesError, match="not 65534"):
        provide(home, NOBODY.pw_uid, NOBODY.pw_gid)
    assert os.listdir(home) == []
    link = tmp_path / "link-home"
    link.symlink_to(home)
    with pytest.raises(ExamplesError, match="cannot open the home"):
        provide(link, 0, 0)
    assert os.listdir(home) == []


def test_a_name_that_is_not_a_plain_file_name_is_refused(home):
    with pytest.raises(ExamplesError, match="not a plain file name"):
        provide(home, NOBODY.pw_uid, NOBODY.pw_gid, {"../escape.ipynb": b"x"})
    assert os.listdir(home) == []


def test_a_wheel_of_the_project_carries_the_examples_and_the_hub_templates(tmp_path):
    # an install that copies the package (no editable link to the source tree) has them too
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "extensions", src / "extensions", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path / "wheel"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    [wheel] = out.glob("paitient-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in shipped():
        assert f"paitient/examples/{name}" in names
    assert "paitient/hub/templates/page.html" in names
