"""Copies one kernel's output into its account's log, up to a cap (root, standard library only, run as a script).

    pump.py CAP ACCOUNT      (stdin: the read end of the kernel's stdout/stderr pipe; stdout: the log file)

The host's launcher starts it beside each kernel, as root, in a session of its own: the kernel writes into a
pipe, never into the log file itself. The first CAP bytes are copied (a traceback of a crash at start is among
them); past CAP one line says so, and the rest is read and dropped (spliced to /dev/null: the kernel never
blocks on a full pipe, and the copy costs no user-space work); when the kernel's last process has closed the
pipe, one line says how many bytes were dropped, and the pump ends. It is no part of the launcher: a launcher
that ends (with the hub) leaves it, and the kernel's writes keep a reader. It runs as root, not as the user
(whose processes could otherwise reach its descriptor of the log through /proc).
"""

from __future__ import annotations

import os
import signal
import sys
import time

CHUNK = 1 << 16


def note(out: int, text: str) -> None:
    line = f"[paitient {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}] {text}\n".encode()
    try:
        os.write(out, line)
    except OSError:
        pass


def drop(src: int) -> int:
    """Read ``src`` to its end, keeping nothing; the number of bytes."""
    dropped = 0
    null = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
    try:
        while True:
            try:
                n = os.splice(src, null, 1 << 20)
            except OSError:  # splice not possible here: read and forget
                n = len(os.read(src, CHUNK))
            if n == 0:
                return dropped
            dropped += n
    finally:
        os.close(null)


def pump(src: int, out: int, cap: int, account: str) -> tuple[int, int]:
    """(bytes kept, bytes dropped) of ``src``'s output copied to ``out``."""
    kept = 0
    while kept < cap:
        data = os.read(src, min(CHUNK, cap - kept))
        if not data:
            return kept, 0
        if kept == 0:
            note(out, f"kernel output of {account} (its first {cap} bytes are kept):")
        try:
            os.write(out, data)  # a short write on a full disk loses the rest of this chunk, no more
        except OSError:
            pass
        kept += len(data)
    note(out, f"kernel output of {account} reached {cap} bytes; the rest is dropped")
    dropped = drop(src)
    note(out, f"kernel output of {account} ended: {dropped} bytes past the cap were dropped")
    return kept, dropped


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: pump.py CAP ACCOUNT", file=sys.stderr)
        return 2
    # a terminal's signals are not for it: it ends when the kernel's last writer is gone
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    pump(0, 1, int(argv[1]), argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
