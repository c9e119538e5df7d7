"""Reading the trail back: filters (pure) and a newest-first reader that stops early.

Used by ``paitient audit show`` and the web view. Records are untrusted text: whoever displays them
escapes them (see :func:`printable` for terminals, ``html.escape`` in the web view).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paitient.rules.records import parse_line
from paitient.services.audit.writer import last_newline, lines_backwards, trail_files

_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class FilterError(ValueError):
    """A filter value is not understood; the message says what is accepted."""


def parse_time(text: str, *, now: dt.datetime | None = None) -> str:
    """``2026-11-28``, ``2026-11-28T17:00``, ``...+01:00`` or a span back from now (``30m``, ``24h``, ``7d``),
    as the trail's own UTC format, so bounds compare with record times as strings."""
    text = text.strip()
    m = _RELATIVE.match(text)
    if m:
        when = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    else:
        try:
            when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise FilterError(
                f"time {text!r} not understood; use e.g. 2026-11-28, 2026-11-28T17:00Z, 24h or 7d"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Filter:
    user: str = ""
    project: str = ""
    action: str = ""
    """Exact (``cell.execute``), a family (``airlock`` matches ``airlock.*``), or a glob (``*.stop``)."""
    since: str = ""
    until: str = ""
    outcome: str = ""

    @classmethod
    def parse(
        cls,
        *,
        user: str = "",
        project: str = "",
        action: str = "",
        since: str = "",
        until: str = "",
        outcome: str = "",
        now: dt.datetime | None = None,
    ) -> Filter:
        return cls(
            user=user.strip(),
            project=project.strip(),
            action=action.strip(),
            since=parse_time(since, now=now) if since.strip() else "",
            until=parse_time(until, now=now) if until.strip() else "",
            outcome=outcome.strip(),
        )


def _details(record: dict[str, Any]) -> dict[str, Any]:
    """The record's ``details`` object, or an empty one where it has none (or something else)."""
    details = record.get("details")
    return details if isinstance(details, dict) else {}


def projects_of(record: dict[str, Any]) -> set[str]:
    """Every project name a record refers to (the places ``audit show --project`` looks at)."""
    out: set[str] = set()
    details = _details(record)
    for key in ("project",):
        if isinstance(details.get(key), str):
            out.add(details[key])
    for key in ("projects",):
        if isinstance(details.get(key), list):
            out.update(p for p in details[key] if isinstance(p, str))
    for key in ("datasets",):
        if isinstance(details.get(key), list):
            out.update(d.split("/", 1)[0] for d in details[key] if isinstance(d, str) and "/" in d)
    obj = record.get("object")
    if isinstance(obj, str) and obj:
        out.add(obj.split("/", 1)[0])
    return out


def matches(record: dict[str, Any], flt: Filter) -> bool:
    """Whether ``record`` passes ``flt``. A user matches as actor or as ``details.user``; a project as
    ``details.project``, an entry of ``details.projects``, the project part of ``details.datasets`` or of
    ``object`` (``<project>/...``)."""
    if flt.user:
        details = _details(record)
        if record.get("actor") != flt.user and details.get("user") != flt.user:
            return False
    if flt.project and flt.project not in projects_of(record):
        return False
    if flt.action:
        action = str(record.get("action", ""))
        if any(c in flt.action for c in "*?["):
            if not fnmatch.fnmatchcase(action, flt.action):
                return False
        elif action != flt.action and not action.startswith(flt.action + "."):
            return False
    if flt.outcome and record.get("outcome") != flt.outcome:
        return False
    t = str(record.get("time", ""))
    if flt.since and t < flt.since:
        return False
    if flt.until and t > flt.until:
        return False
    return True


def newest_first(directory: str | Path) -> Iterator[dict[str, Any]]:
    """Every intact record, newest first. Damaged lines are skipped here; ``verify`` reports them."""
    for _n, path in reversed(trail_files(Path(directory))):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                size = last_newline(fd, size) + 1
            for _off, line in lines_backwards(fd, size):
                try:
                    yield parse_line(line)
                except ValueError:
                    continue
        finally:
            os.close(fd)


def select(
    directory: str | Path,
    flt: Filter,
    *,
    limit: int = 200,
    before: int | None = None,
    include_internal: bool = False,
    view: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
) -> list[dict[str, Any]]:
    """Up to ``limit`` matching records, newest first; ``before`` pages back (records with seq < before).

    File headers (``audit.file``) are left out unless ``include_internal``. With ``view``, each record is
    taken as ``view`` gives it (``None``: left out), and the filter matches what it gives: a reader's filter
    learns nothing of what their view of a record leaves out. Reading stops at ``since``.
    """
    out: list[dict[str, Any]] = []
    for rec in newest_first(directory):
        if before is not None and rec["seq"] >= before:
            continue
        if flt.since and str(rec.get("time", "")) < flt.since:
            break
        if rec["action"] == "audit.file" and not include_internal:
            continue
        seen = rec if view is None else view(rec)
        if seen is not None and matches(seen, flt):
            out.append(seen)
            if len(out) >= limit:
                break
    return out


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """Text safe for one line of a terminal: control characters (newline and tab too: a record's object must
    not start a line that looks like another record) and bidi overrides shown as ``\\xNN``/``\\uNNNN``."""

    def esc(m: re.Match[str]) -> str:
        c = ord(m.group(0))
        return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"

    return _CONTROL.sub(esc, text)
