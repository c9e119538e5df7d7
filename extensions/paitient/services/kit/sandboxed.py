"""Running a root-side service's sandbox (the airlock's audit, a training job's worker) to its end.

The code in such a sandbox runs as the sandbox's account, and so does bubblewrap's init inside it (pid 1 of its
pid namespace), whose memory that code can write through ``/proc/1/mem``: seccomp stops ``ptrace``, not a
write to a file. Patched so that it neither dies with its parent nor exits, the init kept the whole sandbox
alive after its run had ended, after a timeout's kill of the outer bubblewrap and after a restart of the
service: its processes took the account's places (another user's audit could not start), and the output pipe
it held open kept the service's reader waiting. :class:`SandboxInit` learns the init's host pid from
bubblewrap (``--info-fd``), holds it by a pidfd, and kills it at the end of the run, which ends every process
of its pid namespace.

What such a sandbox writes to its stdout and stderr is read with a bound (:class:`Tail`): a run that wrote
gigabytes made the root service hold every byte.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import IO

INFO_SECONDS = 30.0
"""How long bubblewrap may take to say its init's pid."""


class SandboxInit:
    """The pid namespace's init of one bubblewrap run: give :attr:`info_fd` to ``build_bwrap_argv`` (and to
    the process's ``pass_fds``), call :meth:`started` once the process runs, and :meth:`kill` when the run
    ends, however it ended."""

    def __init__(self) -> None:
        self._read, self.info_fd = os.pipe()
        os.set_inheritable(self.info_fd, True)
        self._pidfd: int | None = None
        self.pid = 0

    def start(self, argv: list[str], *, stdout: int, pass_fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
        """Start ``argv`` (whose bubblewrap was given :attr:`info_fd`) from ``/`` with a bare ``PATH``, stderr
        to a pipe, and hold its init; if it cannot start, let go of everything."""
        try:
            proc = subprocess.Popen(
                argv,
                stdout=stdout,
                stderr=subprocess.PIPE,
                cwd="/",
                env={"PATH": "/usr/bin:/bin"},
                pass_fds=(*pass_fds, self.info_fd),
            )
        except BaseException:
            self.kill()
            raise
        self.started()
        return proc

    def started(self, timeout: float = INFO_SECONDS) -> None:
        """Read the init's pid from bubblewrap and hold it; nothing to hold when bubblewrap ended first."""
        os.close(self.info_fd)
        self.info_fd = -1
        data = b""
        deadline = time.monotonic() + timeout
        while len(data) < 65536:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                break
            chunk = os.read(self._read, 4096)
            if not chunk:
                break
            data += chunk
            with contextlib.suppress(ValueError):
                pid = json.loads(data).get("child-pid")
                if isinstance(pid, int) and pid > 1:
                    self.pid = pid
                    break
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                self._pidfd = os.pidfd_open(self.pid)

    def kill(self) -> None:
        """SIGKILL the init, which ends every process of its pid namespace; then let it go."""
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            os.close(self._pidfd)
            self._pidfd = None
        for fd in (self._read, self.info_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._read = self.info_fd = -1


class Tail:
    """A thread that reads ``stream`` to its end and keeps its last ``keep`` bytes."""

    def __init__(self, stream: IO[bytes] | None, keep: int = 65536):
        self.keep = keep
        self._data = bytearray()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[bytes] | None) -> None:
        if stream is None:
            return
        read = getattr(stream, "read1", stream.read)
        while chunk := read(65536):
            self._data += chunk
            if len(self._data) > 2 * self.keep:
                del self._data[: len(self._data) - self.keep]

    def text(self, timeout: float = 5.0) -> str:
        """What was kept, once the stream ended (or ``timeout`` passed)."""
        self._thread.join(timeout)
        return bytes(self._data[-self.keep :]).decode("utf-8", "replace")


def read_lines(stream: IO[bytes], limit: int) -> Iterator[bytes]:
    """The lines of ``stream`` (without their ends), each cut at ``limit`` bytes; what a line holds past that
    is read and dropped, so no line is held whole."""
    while True:
        line = stream.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            while (rest := stream.readline(limit + 1)) and not rest.endswith(b"\n"):
                pass
        yield line[:limit].rstrip(b"\n")
