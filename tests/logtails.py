"""The logs of the workspaces and servers a failed test ran against, in its report.

A workspace or user's server that a test starts is gone by the time anyone reads why the test failed (its
directory is removed with it), and CI keeps only what pytest prints. So each one names its logs here while
it runs, and a failed test's report (``tests/conftest.py``) carries the end of each: the lines that say
what went wrong on the server side, where the test saw only that nothing came.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path

TAIL_LINES = 40
"""Lines from the end of each log."""
NOTABLE_LINES = 20
"""Warnings, errors and tracebacks from anywhere in each log, besides its tail."""
NOTABLE = ("[W ", "[E ", "[C ", "WARNING", "ERROR", "CRITICAL", "Traceback", "Error:")

_lock = threading.Lock()
_running: dict[int, Callable[[], Iterable[Path]]] = {}


def watch(owner: object, logs: Callable[[], Iterable[Path]]) -> None:
    """While ``owner`` runs, a failed test's report carries the end of each file ``logs()`` names then."""
    with _lock:
        _running[id(owner)] = logs


def unwatch(owner: object) -> None:
    with _lock:
        _running.pop(id(owner), None)


def tail(path: Path) -> str:
    """The notable lines of a log (:data:`NOTABLE`, the last :data:`NOTABLE_LINES`) and its last lines."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(cannot read it: {e})"
    head = lines[:-TAIL_LINES]
    notable = [line for line in head if any(mark in line for mark in NOTABLE)][-NOTABLE_LINES:]
    parts = []
    if notable:
        parts.append(f"... {len(notable)} notable of the {len(head)} lines before the tail:")
        parts.extend(notable)
        parts.append("... the tail:")
    parts.extend(lines[-TAIL_LINES:])
    return "\n".join(parts)


def sections(since: float = 0.0) -> list[tuple[str, str]]:
    """One report section per log of every workspace and server running now that was written to at
    ``since`` (a time as :func:`time.time` gives it) or later: a server the session keeps for other tests,
    quiet while this one ran, adds nothing."""
    with _lock:
        sources = list(_running.values())
    out = []
    for logs in sources:
        for path in sorted(set(logs())):
            try:
                written = path.stat().st_mtime
            except OSError:
                continue
            if written >= since:
                out.append((f"log {path}", tail(path)))
    return out
