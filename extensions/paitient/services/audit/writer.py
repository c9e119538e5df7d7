"""The file side of the trail: append chained records safely from many processes, rotate, recover.

Layout under the trail directory (``<state_dir>/audit``, root-owned, 0750)::

    trail-000001.jsonl  trail-000002.jsonl ...   one record per line; each file begins with a header
    head.json                                    the last record written (file, seq, hash): catches cut tails
    quarantine/                                  torn or corrupt bytes found at a tail, kept as evidence
    .lock                                        flock serialising writers of all processes

One append: take the lock, read the last record of the newest file (so the chain is right whichever
process wrote last), write the new line in one ``write``, fsync, update ``head.json``, release.
A tail that is not a good record is never chained onto: the writer copies it to ``quarantine/``, writes
an ``audit.recovered`` record naming it (offset, length, SHA-256), and continues from the last good record.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Unpack

from paitient.fsutil import fsync_dir
from paitient.rules.records import (
    GENESIS,
    HEADER_ACTION,
    RECOVERED_ACTION,
    AuditError,
    Event,
    encode,
    make_record,
    parse_line,
    prepare_event,
    seal,
)

FILE_RE = re.compile(r"^trail-(\d{6,})\.jsonl$")
DIR_MODE = 0o750
FILE_MODE = 0o640
DEFAULT_ROTATE_BYTES = 64 << 20
HEAD_SIZE = 512
"""head.json is rewritten in place at a fixed size (padded), so one pwrite replaces it whole."""


def check_dir_stat(st: os.stat_result, euid: int) -> str:
    """What is wrong with the trail directory's owner or mode ('' if nothing): users must not write there."""
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if st.st_uid != euid:
        return f"it is owned by uid {st.st_uid}, not by the writer (uid {euid}); run: chown root:root DIR"
    if st.st_mode & 0o022:
        return f"group or others may write to it (mode {stat.S_IMODE(st.st_mode):o}); run: chmod 750 DIR"
    return ""


def file_name(number: int) -> str:
    return f"trail-{number:06d}.jsonl"


def trail_files(directory: Path) -> list[tuple[int, Path]]:
    """The trail's files in chain order (by number)."""
    out = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        m = FILE_RE.match(name)
        if m:
            out.append((int(m.group(1)), directory / name))
    return sorted(out)


def lines_backwards(fd: int, end: int, chunk: int = 65536) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, line_without_newline)`` of the newline-ended lines before ``end``, last first."""
    pos = end
    buf = b""
    while True:
        if pos > 0:
            start = max(0, pos - chunk)
            buf = os.pread(fd, pos - start, start) + buf
            pos = start
        # buf covers [pos, pos+len(buf)); it ends with b"\n" of the line we are about to yield
        while True:
            nl = buf.rfind(b"\n", 0, len(buf) - 1)
            if nl < 0:
                break
            yield pos + nl + 1, buf[nl + 1 : -1]
            buf = buf[: nl + 1]
        if pos == 0:
            if buf:
                yield 0, buf[:-1]
            return


@dataclass
class Tail:
    """What the writer found at the end of the newest file."""

    last: dict[str, Any] | None
    """The last good record (None only if the file holds none)."""
    good_end: int
    """Offset just after the last good record's newline."""
    size: int
    damaged: bytes = b""
    """Bytes after the last good record that are not a good record."""
    reason: str = ""
    """``torn`` (no final newline: crash mid-append) or ``corrupt`` (whole lines that do not check out)."""


def read_tail(fd: int) -> Tail:
    size = os.fstat(fd).st_size
    if size == 0:
        return Tail(None, 0, 0)
    end = size
    torn = False
    if os.pread(fd, 1, size - 1) != b"\n":
        torn = True
        prev_nl = last_newline(fd, size)
        end = prev_nl + 1 if prev_nl >= 0 else 0
    corrupt = False
    for offset, line in lines_backwards(fd, end, chunk=8192):
        try:
            record = parse_line(line)
        except ValueError:
            corrupt = True
            continue
        good_end = offset + len(line) + 1
        damaged = os.pread(fd, size - good_end, good_end) if good_end < size else b""
        reason = "corrupt" if corrupt else ("torn" if torn else "")
        return Tail(record, good_end, size, damaged, reason)
    return Tail(None, 0, size, os.pread(fd, size, 0), "corrupt" if corrupt else "torn")


def last_newline(fd: int, size: int, chunk: int = 65536) -> int:
    pos = size
    while pos > 0:
        start = max(0, pos - chunk)
        i = os.pread(fd, pos - start, start).rfind(b"\n")
        if i >= 0:
            return start + i
        pos = start
    return -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


_TAILS: dict[str, tuple[str, int, int, int, int, dict[str, Any]]] = {}
"""Per trail directory: (file, dev, inode, size, mtime_ns, last record) after this process's last append.
Any other write changes size or mtime, so a mismatch means: read the tail from the file again."""


class AuditLog:
    """Appends to the trail in ``directory``. Safe for many threads and processes at once."""

    def __init__(self, directory: str | os.PathLike[str], *, rotate_bytes: int = DEFAULT_ROTATE_BYTES):
        self.directory = Path(directory)
        self.rotate_bytes = rotate_bytes
        self.lock_path = self.directory / ".lock"
        self.head_path = self.directory / "head.json"
        self.quarantine = self.directory / "quarantine"

    # ---------------------------------------------------------------- public

    def append(self, **event: Unpack[Event]) -> dict[str, Any]:
        """Append one record and return it (with seq and hash). Raises :class:`AuditError` if it cannot."""
        return self.append_many([dict(event)])[-1]

    def append_many(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append several records under one lock and one fsync (same guarantees as :meth:`append`)."""
        try:
            # The folder first: a trail that cannot be written refuses at the cost of a stat, not of preparing
            # every event (a writer retrying a long backlog while the trail is down would pay that each time).
            self._ensure_dir()
            # Validate before taking the lock: a bad event must not leave half a batch behind.
            events = [prepare_event(**ev) for ev in events]
            lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise AuditError(
                f"cannot open the audit trail in {self.directory}: {e.strerror}; "
                "it must be a root-owned directory the writer can create files in"
            ) from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            return self._append_locked(events)
        except OSError as e:
            raise AuditError(f"writing the audit trail in {self.directory} failed: {e}") from None
        finally:
            os.close(lock_fd)

    # ---------------------------------------------------------------- internals

    def _ensure_dir(self) -> None:
        try:
            st = os.stat(self.directory)
        except FileNotFoundError:
            self.directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            os.chmod(self.directory, DIR_MODE)
            st = os.stat(self.directory)
        problem = check_dir_stat(st, os.geteuid())
        if problem:
            raise AuditError(f"refusing to write the audit trail in {self.directory}: {problem}")

    def _append_locked(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        files = trail_files(self.directory)
        if not files:
            number, path = 1, self.directory / file_name(1)
            self._create_file(path, prev=GENESIS, seq=0, previous="")
            files = [(number, path)]
        number, path = files[-1]
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        try:
            tail = self._cached_tail(fd, path) or read_tail(fd)
            out: list[bytes] = []  # joined once: adding to one bytes object would copy it for every record
            last = tail.last
            if last is None:
                raise AuditError(
                    f"{path} holds no intact record (its header is damaged or it is empty), so the chain "
                    "cannot continue. Run `paitient audit verify`, move the file aside as evidence, retry."
                )
            if tail.damaged:
                if tail.reason == "torn" and _continues(last, tail.damaged):
                    # The crash hit between a whole record and its newline: keep the record.
                    out = [b"\n"]
                    last = parse_line(tail.damaged)
                else:
                    recovered, sep = self._recovery(path, tail, last)
                    out = [sep, encode(recovered)]
                    last = recovered
            size = tail.size + sum(map(len, out))
            written = []
            for ev in events:
                if size >= self.rotate_bytes and last["action"] != HEADER_ACTION:
                    if out:
                        self._write_out(fd, b"".join(out))
                        out = []
                    os.fsync(fd)
                    os.close(fd)
                    number += 1
                    previous, path = path, self.directory / file_name(number)
                    last = self._create_file(path, prev=last["hash"], seq=last["seq"] + 1, previous=previous.name)
                    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
                    size = os.fstat(fd).st_size
                record = seal(ev, seq=last["seq"] + 1, prev=last["hash"])
                line = encode(record)
                out.append(line)
                size += len(line)
                written.append(record)
                last = record
            self._write_out(fd, b"".join(out))
            os.fsync(fd)
            self._write_head(path.name, last)
            st = os.fstat(fd)
            _TAILS[str(self.directory)] = (path.name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, last)
            return written
        finally:
            os.close(fd)

    def _cached_tail(self, fd: int, path: Path) -> Tail | None:
        """The tail this process wrote last, if the file is still exactly as it left it (same inode, size)."""
        cached = _TAILS.get(str(self.directory))
        if cached is None:
            return None
        st = os.fstat(fd)
        if cached[:5] != (path.name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns):
            return None
        return Tail(cached[5], st.st_size, st.st_size)

    def _create_file(self, path: Path, *, prev: str, seq: int, previous: str) -> dict[str, Any]:
        """Publish a new trail file whose only line is its header record (never an empty file)."""
        header = make_record(
            seq=seq,
            prev=prev,
            actor="system",
            action=HEADER_ACTION,
            object=path.name,
            details={"file": path.name, "previous_file": previous},
        )
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        try:
            _write_all(fd, encode(header))
            os.fsync(fd)
            os.fchmod(fd, FILE_MODE)
        finally:
            os.close(fd)
        os.link(tmp, path)  # fails if the file exists: never replace a trail file
        os.unlink(tmp)
        fsync_dir(self.directory)
        return header

    def _write_out(self, fd: int, data: bytes) -> None:
        """Write the new lines (one ``write`` call for up to 2 GiB). Tests override it to crash mid-line."""
        _write_all(fd, data)

    def _recovery(self, path: Path, tail: Tail, last: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        """Quarantine the damaged tail and build the ``audit.recovered`` record chaining past ``last``."""
        damaged = tail.damaged
        digest = hashlib.sha256(damaged).hexdigest()
        self.quarantine.mkdir(mode=DIR_MODE, exist_ok=True)
        qpath = self.quarantine / f"{path.name}.{tail.good_end}.{tail.reason}"
        fd = os.open(qpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, damaged)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.quarantine)
        prefix = b"" if damaged.endswith(b"\n") else b"\n"
        record = make_record(
            seq=last["seq"] + 1,
            prev=last["hash"],
            actor="system",
            action=RECOVERED_ACTION,
            object=path.name,
            outcome="error",
            details={
                "reason": tail.reason,
                "file": path.name,
                "offset": tail.good_end,
                "length": len(damaged),
                "sha256": digest,
                "quarantine": str(qpath.relative_to(self.directory)),
                "after_seq": last["seq"],
            },
        )
        return record, prefix

    def _write_head(self, name: str, last: dict[str, Any]) -> None:
        data = json.dumps({"file": name, "seq": last["seq"], "hash": last["hash"]}).encode()
        data = data.ljust(HEAD_SIZE - 1) + b"\n"
        fd = os.open(self.head_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            os.pwrite(fd, data, 0)
        finally:
            os.close(fd)


def _continues(last: dict[str, Any], tail: bytes) -> bool:
    try:
        record = parse_line(tail)
    except ValueError:
        return False
    return record["prev"] == last["hash"] and record["seq"] == last["seq"] + 1


def read_head(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / "head.json").read_bytes())
    except (FileNotFoundError, ValueError):
        return None
