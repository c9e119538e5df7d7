"""`paitient up` records the process ids of what it runs; status and stop read them back."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from paitient.ops.directory import DemoDirectory
from paitient.ops.up import UpCommand


def test_the_recorded_pids_leave_out_a_directory_that_has_exited(tmp_path):
    # A pid of None in up.json would break `paitient status` and `paitient stop`: a directory that died
    # between its start and the record is left out until the watcher has started it again.
    directory = DemoDirectory(tmp_path / "state")
    hub = subprocess.Popen(["sleep", "60"])
    up = UpCommand()
    up.children, up.directory = {"hub": hub}, directory
    try:
        directory.start()
        first = directory.pid
        assert up._pids() == {"directory": first, "hub": hub.pid}
        os.kill(first, signal.SIGKILL)  # the slapd this test started, by its pid
        deadline = time.monotonic() + 10
        while directory.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert up._pids() == {"hub": hub.pid}
        directory.start()
        assert directory.pid not in (None, first)
        assert up._pids() == {"directory": directory.pid, "hub": hub.pid}
    finally:
        directory.stop()
        hub.kill()
        hub.wait(5)
