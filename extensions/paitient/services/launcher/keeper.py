"""The parent of one sandboxed kernel, run as the user by the launcher (standard library only, run as a script).

    keeper.py SERVER_PID SERVER_START SECCOMP_FD -- prlimit ... bwrap ... kernel ...

It waits for its stdin to close (the launcher first puts it in its account's cpu group, :mod:`.cpu`, so all
the kernel starts lands there), starts the command (passing the seccomp filter's descriptor on, and no
stdin) and waits for it. bubblewrap dies with its
parent (``--die-with-parent``): with the keeper as that parent, a launcher that ends (it ends with the hub)
takes no kernel with it, and the kernel still ends with the server that asked for it: the keeper checks that
server (pid and start time) every half second and kills the kernel when it is gone. A SERVER_PID of 0 names no
server: the launcher cannot see it (a pod's server, in a container of its own), and the kernel ends with the
keeper. SIGTERM, SIGINT and SIGHUP kill the kernel too; SIGKILL of the keeper ends the sandbox through
bubblewrap's parent-death signal.

Killing the kernel kills the sandbox's init (bubblewrap's pid 1 of its pid namespace, whose host pid bubblewrap
gives on ``--info-fd``), which ends everything in the sandbox. That init runs as the user, and a kernel can
rewrite its code through ``/proc/1/mem`` so that it neither dies with its parent nor exits: a sandbox so kept
outlived its kernel's end, with the datasets it mounted (a member since taken out of the project kept reading
them), uncounted among the account's kernels.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time

WATCH_SECONDS = 0.5
INFO_SECONDS = 30.0
"""How long bubblewrap may take to say its init's pid."""


def process_start(pid: int) -> int | None:
    """As :func:`paitient.services.kit.process.process_start`: the keeper runs as a script with the standard
    library alone, so it cannot import that one."""
    try:
        with open(f"/proc/{pid}/stat") as f:  # not pathlib: its imports would add 0.6 MiB to every keeper
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def with_info_fd(command: list[str], fd: int) -> list[str]:
    """``command`` with bubblewrap told to write its init's pid to ``fd`` (unchanged where it runs no bwrap)."""
    for i, part in enumerate(command):
        if os.path.basename(part) == "bwrap":
            return [*command[: i + 1], "--info-fd", str(fd), *command[i + 1 :]]
    return command


def sandbox_init(fd: int) -> int | None:
    """A pidfd of the sandbox's init, from what bubblewrap writes to ``fd`` (``{"child-pid": N}``); None when
    it wrote nothing (it ended first). As :meth:`paitient.services.kit.sandboxed.SandboxInit.started`: the
    keeper runs with the standard library alone, so it cannot import that one."""
    data = b""
    deadline = time.monotonic() + INFO_SECONDS
    while len(data) < 65536:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        data += chunk
        with contextlib.suppress(ValueError):
            pid = json.loads(data).get("child-pid")
            if isinstance(pid, int) and pid > 1:
                try:
                    return os.pidfd_open(pid)
                except ProcessLookupError:
                    return None
    return None


def main(argv: list[str]) -> int:
    if len(argv) < 6 or argv[4] != "--":
        print("usage: keeper.py SERVER_PID SERVER_START SECCOMP_FD -- COMMAND...", file=sys.stderr)
        return 2
    server_pid, server_start, fd = int(argv[1]), int(argv[2]), int(argv[3])
    sys.stdin.buffer.read()  # until the launcher has placed this process
    info_read, info_write = os.pipe()
    command = with_info_fd(argv[5:], info_write)
    proc = subprocess.Popen(command, pass_fds=(info_write, *((fd,) if fd >= 0 else ())), stdin=subprocess.DEVNULL)
    os.close(info_write)
    init = sandbox_init(info_read) if command != argv[5:] else None
    os.close(info_read)

    def kill() -> None:
        if init is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(init, signal.SIGKILL)
        proc.kill()

    def end(_signum: int, _frame: object) -> None:
        kill()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, end)
    # Wait on a pidfd, waking twice a second to look at the server: Popen.wait(timeout) polls every 50 ms,
    # and twenty wakeups a second of each kernel's keeper in its account's cpu group let one account's
    # wakeup-heavy kernel (a pipe written a byte at a time) take a whole CPU from another account's.
    watch = select.poll()
    watch.register(os.pidfd_open(proc.pid), select.POLLIN)
    try:
        while True:
            if watch.poll(WATCH_SECONDS * 1000) or proc.poll() is not None:
                return proc.wait()
            if server_pid > 0 and process_start(server_pid) != server_start:
                kill()
    finally:
        kill()  # whatever ended the kernel, nothing of its sandbox stays


if __name__ == "__main__":
    sys.exit(main(sys.argv))
