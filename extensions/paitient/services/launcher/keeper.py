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
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

WATCH_SECONDS = 0.5


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


def main(argv: list[str]) -> int:
    if len(argv) < 6 or argv[4] != "--":
        print("usage: keeper.py SERVER_PID SERVER_START SECCOMP_FD -- COMMAND...", file=sys.stderr)
        return 2
    server_pid, server_start, fd = int(argv[1]), int(argv[2]), int(argv[3])
    sys.stdin.buffer.read()  # until the launcher has placed this process
    proc = subprocess.Popen(argv[5:], pass_fds=(fd,) if fd >= 0 else (), stdin=subprocess.DEVNULL)

    def end(_signum: int, _frame: object) -> None:
        proc.kill()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, end)
    # Wait on a pidfd, waking twice a second to look at the server: Popen.wait(timeout) polls every 50 ms,
    # and twenty wakeups a second of each kernel's keeper in its account's cpu group let one account's
    # wakeup-heavy kernel (a pipe written a byte at a time) take a whole CPU from another account's.
    watch = select.poll()
    watch.register(os.pidfd_open(proc.pid), select.POLLIN)
    while True:
        if watch.poll(WATCH_SECONDS * 1000) or proc.poll() is not None:
            return proc.wait()
        if server_pid > 0 and process_start(server_pid) != server_start:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
