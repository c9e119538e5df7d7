"""The contents manager reads what it checked: a path swapped between the check and the read.

A kernel flipped ``~/race.txt`` between a file and a symlink to the server's configuration, outside the
home, while the browser asked for it; once in some 2,800 requests the swap fell between the manager's check
of the path and its ``open()``, and the configuration was served. The read now checks what the descriptor
it opened names, and that it is a regular file (a FIFO swapped in would have held the server's event loop).
The swap is made here exactly inside that window, so the test does not depend on luck.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from tornado.web import HTTPError

from paitient.server.contents import ConfinedContentsManager


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "home").mkdir()
    (tmp_path / "outside.json").write_text('{"secret": "the server configuration"}')
    return tmp_path / "home"


def test_a_file_swapped_for_a_symlink_out_of_the_home_after_its_check_is_not_read(home: Path):
    manager = ConfinedContentsManager(root_dir=str(home))
    race = home / "race.txt"
    race.write_text("notes\n")
    os_path = manager._get_os_path("race.txt")  # the check passes: a file in the home
    race.unlink()
    race.symlink_to(home.parent / "outside.json")  # the kernel's swap, inside the window
    with pytest.raises(HTTPError) as refused:
        manager._read_capped("race.txt", os_path)
    assert refused.value.status_code == 404 and "outside the home folder" in refused.value.log_message
    # A symlink that stays in the home still reads; the file itself reads.
    (home / "notes.txt").write_text("mine\n")
    race.unlink()
    race.symlink_to(home / "notes.txt")
    assert manager._read_capped("race.txt", os_path) == b"mine\n"


def test_a_fifo_swapped_in_after_the_check_is_refused_without_waiting_for_a_writer(home: Path):
    manager = ConfinedContentsManager(root_dir=str(home))
    race = home / "race.txt"
    race.write_text("notes\n")
    os_path = manager._get_os_path("race.txt")
    race.unlink()
    os.mkfifo(race)
    done: list[BaseException] = []

    def read() -> None:
        try:
            manager._read_capped("race.txt", os_path)
        except BaseException as e:
            done.append(e)

    reader = threading.Thread(target=read, daemon=True)
    started = time.monotonic()
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "the read waited for a writer of the FIFO"
    assert time.monotonic() - started < 5
    assert isinstance(done[0], HTTPError) and done[0].status_code == 409
    assert "is not a file" in done[0].log_message
