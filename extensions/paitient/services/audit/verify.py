"""Checking the chain: finds edited, removed, inserted and reordered records, torn lines and cut tails.

:func:`check_trail` is pure: it takes the files' names and lines (bytes, newline kept) and the head
marker, and returns a :class:`Report`. :func:`verify_dir` feeds it from a trail directory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paitient.rules.records import FIELDS, GENESIS, HEADER_ACTION, RECOVERED_ACTION, encode, record_hash
from paitient.services.audit.writer import FILE_RE, file_name, read_head, trail_files

MAX_PROBLEMS = 50


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    seq: int | None
    message: str

    def __str__(self) -> str:
        seq = f" (seq {self.seq})" if self.seq is not None else ""
        return f"{self.file} line {self.line}{seq}: {self.message}"


@dataclass
class Report:
    records: int = 0
    files: int = 0
    last_seq: int | None = None
    last_hash: str = ""
    problems: list[Finding] = field(default_factory=list)
    notes: list[Finding] = field(default_factory=list)
    """Recoveries after a crash: the trail is intact, but a write was torn and quarantined."""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_problem(self) -> Finding | None:
        return self.problems[0] if self.problems else None


@dataclass
class _Damage:
    file: str
    line: int
    offset: int
    data: bytes
    seq: int | None
    reason: str


def _decode(line: bytes) -> tuple[dict[str, Any] | None, int | None, str]:
    """(record or None, seq if readable, what is wrong)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None, None, "not a JSON record (the line is damaged or was edited by hand)"
    if not isinstance(rec, dict):
        return None, None, "not a JSON object"
    seq = rec.get("seq") if isinstance(rec.get("seq"), int) and not isinstance(rec.get("seq"), bool) else None
    missing = [f for f in FIELDS if f not in rec]
    if missing:
        return None, seq, f"missing field(s) {', '.join(missing)}"
    extra = sorted(set(rec) - set(FIELDS))
    if extra:
        return None, seq, f"unexpected field(s) {', '.join(extra)}"
    if seq is None:
        return None, None, "seq is not a whole number"
    try:
        digest = record_hash(rec)
    except ValueError:
        return None, seq, "not canonical JSON"
    if digest != rec["hash"]:
        return None, seq, "content does not match its hash: the record was altered"
    if encode(rec)[:-1] != line:
        return None, seq, "the line is not byte for byte what the writer wrote (re-encoded or edited)"
    return rec, seq, ""


class _Checker:
    def __init__(self, head: dict[str, Any] | None):
        self.report = Report()
        self.head = head
        self.prev_hash = GENESIS
        self.prev_seq = -1
        self.prev_file = ""
        self.prev_number = 0
        self.damage: list[_Damage] = []
        self.head_seen = False

    def problem(self, file: str, line: int, seq: int | None, message: str) -> None:
        if len(self.report.problems) < MAX_PROBLEMS:
            self.report.problems.append(Finding(file, line, seq, message))

    def file(self, name: str, lines: Iterable[bytes]) -> None:
        m = FILE_RE.match(name)
        number = int(m.group(1)) if m else 0
        if number != self.prev_number + 1:
            missing = file_name(self.prev_number + 1)
            self.problem(name, 0, None, f"{missing} is missing: files were removed from the trail")
        self.prev_number = number
        self.report.files += 1
        offset = 0
        first = True
        line_no = 0
        for line_no, raw in enumerate(lines, 1):
            torn = not raw.endswith(b"\n")
            body = raw[:-1] if not torn else raw
            rec, seq, error = _decode(body)
            if torn:
                self.damage.append(_Damage(name, line_no, offset, body, seq, "torn"))
            elif rec is None:
                self.damage.append(_Damage(name, line_no, offset, body, seq, error))
            else:
                self.record(name, line_no, rec, first)
                first = False
            offset += len(raw)
        self.flush_damage(None)
        if line_no == 0:
            self.problem(name, 0, None, "the file is empty (its header record is missing)")
        self.prev_file = name

    def record(self, name: str, line: int, rec: dict[str, Any], first: bool) -> None:
        seq = rec["seq"]
        self.flush_damage(rec)
        if first:
            details = rec.get("details") or {}
            if rec["action"] != HEADER_ACTION or details.get("file") != name:
                self.problem(name, line, seq, f"the file does not begin with its {HEADER_ACTION} header record")
            elif details.get("previous_file", "") != self.prev_file:
                self.problem(
                    name,
                    line,
                    seq,
                    f"the header names {details.get('previous_file')!r} as the "
                    f"previous file, but the trail has {self.prev_file!r}",
                )
        elif rec["action"] == HEADER_ACTION:
            self.problem(name, line, seq, "a file header in the middle of a file: lines were moved")
        if rec["prev"] != self.prev_hash:
            before = self.prev_seq
            if seq > before + 1:
                what = (
                    f"record(s) seq {before + 1}..{seq - 1} are missing (deleted)"
                    if before >= 0
                    else "the records before it are missing (the trail does not start at its beginning)"
                )
            elif seq <= before:
                what = f"seq {seq} follows seq {before}: records were reordered or inserted"
            else:
                what = (
                    f"its prev does not match the hash of seq {before}: a record was inserted or "
                    "replaced here, or the record before was rewritten with a new hash"
                )
            self.problem(name, line, seq, what)
        elif seq != self.prev_seq + 1:
            self.problem(name, line, seq, f"seq jumps from {self.prev_seq} to {seq}")
        if self.head and seq == self.head.get("seq"):
            self.head_seen = True
            if rec["hash"] != self.head.get("hash"):
                self.problem(name, line, seq, "differs from the record head.json says was written last")
        self.prev_hash = rec["hash"]
        self.prev_seq = seq
        self.report.records += 1
        self.report.last_seq = seq
        self.report.last_hash = rec["hash"]

    def flush_damage(self, following: dict[str, Any] | None) -> None:
        """Damaged lines are fine only as one torn write that the next record recovered."""
        if not self.damage:
            return
        damage, self.damage = self.damage, []
        d = damage[0]
        if following is not None and len(damage) == 1 and following["action"] == RECOVERED_ACTION:
            info = following.get("details") or {}
            if (
                info.get("reason") == "torn"
                and info.get("offset") == d.offset
                and info.get("length") == len(d.data)
                and info.get("sha256") == hashlib.sha256(d.data).hexdigest()
            ):
                self.report.notes.append(
                    Finding(
                        d.file,
                        d.line,
                        None,
                        f"torn write of {len(d.data)} bytes (a crash mid-append), quarantined as "
                        f"{info.get('quarantine')} and noted by seq {following['seq']}",
                    )
                )
                return
        if d.reason == "torn":
            where = "last line" if following is None else "line"
            msg = (
                f"torn {where}: {len(d.data)} bytes without a line end (a crash mid-append, or a cut); "
                "the next write quarantines it and records audit.recovered"
            )
        else:
            msg = d.reason
        self.problem(d.file, d.line, d.seq, msg)

    def finish(self) -> Report:
        self.flush_damage(None)
        if self.head is not None and not self.head_seen:
            hseq = self.head.get("seq")
            if isinstance(hseq, int) and hseq > self.prev_seq:
                self.problem(
                    self.head.get("file", "?"),
                    0,
                    hseq,
                    f"head.json says seq {hseq} was written, the trail ends at seq {self.prev_seq}: "
                    "records were removed from the end",
                )
        return self.report


def check_trail(files: Iterable[tuple[str, Iterable[bytes]]], head: dict[str, Any] | None = None) -> Report:
    """Check the chain across ``files`` (name, lines with their newlines), in order. Pure."""
    checker = _Checker(head)
    files = list(files)
    if not files:
        checker.problem("-", 0, None, "no trail files found")
    for name, lines in files:
        checker.file(name, lines)
    return checker.finish()


def _lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        yield from f


def verify_dir(directory: str | Path) -> Report:
    """Check the trail in ``directory``; raises PermissionError if it cannot be read (run as root)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no audit trail at {directory}")
    files = [(p.name, _lines(p)) for _n, p in trail_files(directory)]
    return check_trail(files, read_head(directory))
