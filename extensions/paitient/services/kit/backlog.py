"""Audit records a root-side service could not write to the trail, waiting until it can.

When the trail refuses a service's records they wait in a :class:`Backlog`, in order, and are written before
any record after them once it takes records again; each record that waited then says in ``details.happened``
when it happened (the trail stamps when it is written). The waiting records are held in the service's own
database (its table ``held_records``, which each store's migrations make; :class:`HeldRecords`), or, for the
hub, which has no database of paitient's, in a file (:class:`HeldFile`), so a service killed or restarted
meanwhile loses none: the next one starts with them waiting and writes them first. Should the database refuse
them too, they wait in memory only, and the service says so in its log.

Written at least once: if the trail took them and the service stopped before it forgot them, the next start
writes them again, with the same ``happened``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol, cast

import sqlalchemy as sa

from paitient.fsutil import atomic_write_text
from paitient.rules.records import Event, RecordError, prepare_event
from paitient.services.kit.db import Database

__all__ = ["HELD_RECORDS_TABLE", "LIMIT", "MALFORMED", "OVERFLOW", "Backlog", "Held", "HeldFile", "HeldRecords"]

HELD_RECORDS_TABLE = """CREATE TABLE held_records (
    seq BIGINT PRIMARY KEY,
    held DOUBLE PRECISION NOT NULL,
    record TEXT NOT NULL
)"""
"""The table, as the stores' migrations make it (the same SQL on SQLite and PostgreSQL; ``seq`` is given by
:meth:`HeldRecords.hold`, in the order the records came in). Made once: a change is a new migration."""


class Held(Protocol):
    """Where a :class:`Backlog` holds its records: numbered in the order held."""

    def hold(self, records: list[dict[str, Any]]) -> list[int]: ...

    def held(self) -> list[tuple[int, dict[str, Any]]]: ...

    def drop(self, seqs: list[int]) -> None: ...


class HeldRecords:
    """The ``held_records`` table of one store: records kept for the trail, numbered in the order held."""

    def __init__(self, db: Database):
        self.db = db

    def hold(self, records: list[dict[str, Any]]) -> list[int]:
        """Keep ``records`` after those already held, in this order, all or none; return their numbers."""
        with self.db.transaction(write=True) as conn:
            last = conn.execute(sa.text("SELECT COALESCE(MAX(seq), 0) FROM held_records")).scalar_one()
            seqs = list(range(int(last) + 1, int(last) + 1 + len(records)))
            now = time.time()
            for seq, record in zip(seqs, records, strict=True):
                conn.execute(
                    sa.text("INSERT INTO held_records (seq, held, record) VALUES (:seq, :held, :record)"),
                    {"seq": seq, "held": now, "record": json.dumps(record, sort_keys=True)},
                )
        return seqs

    def count(self) -> int:
        """How many records are held (not counting a backlog's count of those it could not keep)."""
        with self.db.transaction(write=False) as conn:
            query = sa.text("SELECT COUNT(*) FROM held_records WHERE record NOT LIKE :count")
            return int(conn.execute(query, {"count": '{"overflow":%'}).scalar_one())

    def held(self) -> list[tuple[int, dict[str, Any]]]:
        """The records held, in order: ``(number, record)``."""
        with self.db.transaction(write=False) as conn:
            rows = conn.execute(sa.text("SELECT seq, record FROM held_records ORDER BY seq")).all()
        return [(int(seq), json.loads(record)) for seq, record in rows]

    def drop(self, seqs: list[int]) -> None:
        """Forget held records (the trail has them now)."""
        if not seqs:
            return
        with self.db.transaction(write=True) as conn:
            for seq in seqs:
                conn.execute(sa.text("DELETE FROM held_records WHERE seq = :seq"), {"seq": seq})


class HeldFile:
    """Records held in a file of their own (root 0600 in a 0700 folder), for one process and one instance of
    this class in it (:func:`paitient.hub.records.backlog` keeps one per state directory): one JSON line per
    record, appended and fsync'd. A line a crash cut short is skipped; forgetting rewrites the file
    atomically."""

    def __init__(self, path: Path):
        self.path = path
        self._last: int | None = None
        """The last number given (read from the file once): numbers keep rising, also past a drop."""

    def hold(self, records: list[dict[str, Any]]) -> list[int]:
        if self._last is None:
            held = self.held()
            self._last = held[-1][0] if held else 0
        seqs = list(range(self._last + 1, self._last + 1 + len(records)))
        now = time.time()
        lines = "".join(
            json.dumps({"seq": seq, "held": now, "record": record}, sort_keys=True) + "\n"
            for seq, record in zip(seqs, records, strict=True)
        )
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size and not self._ends_whole():
                lines = "\n" + lines  # after a line a crash cut short, on a line of its own
            os.write(fd, lines.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self._last = seqs[-1] if seqs else self._last
        return seqs

    def _ends_whole(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def _entries(self) -> list[dict[str, Any]]:
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                entry = json.loads(line)
                int(entry["seq"]), dict(entry["record"])
            except (ValueError, KeyError, TypeError):
                continue
            out.append(entry)
        return out

    def held(self) -> list[tuple[int, dict[str, Any]]]:
        return [(int(e["seq"]), dict(e["record"])) for e in self._entries()]

    def drop(self, seqs: list[int]) -> None:
        gone = set(seqs)
        if not gone:
            return
        kept = [e for e in self._entries() if int(e["seq"]) not in gone]
        if not kept:
            self.path.unlink(missing_ok=True)
            return
        atomic_write_text(self.path, "".join(json.dumps(e, sort_keys=True) + "\n" for e in kept), mode=0o600)


class _Waiting(NamedTuple):
    event: Event
    happened: str
    held: int | None = None
    """Once a write of it failed: its number among the held records (0: in memory only)."""

    @property
    def written(self) -> Event:
        """The record as it is written: one that waited says in its details when it happened (the trail
        stamps when it is written)."""
        if self.held is None:
            return self.event
        return Event(**{**self.event, "details": {**(self.event.get("details") or {}), "happened": self.happened}})


LIMIT = 100_000
"""The most records one service keeps waiting for the trail (tens of MB, held)."""
MALFORMED = "audit.malformed"
"""The record written in place of one the trail would refuse for what it is (a writer's bug)."""
OVERFLOW = "audit.overflow"
"""The record that says how many records a backlog could not keep, written once the trail is back."""
RETRY_WAIT = 9.0
"""After the trail refused a write, :meth:`Backlog.write` tries it again only once this many times as long as
the failed try took has passed: a long backlog (a try prepares every record waiting) against a full disk then
takes at most a tenth of the writer's time, while a short one, or a refusal that costs nothing, is tried at
once. :meth:`Backlog.flush`, which an action that needs the trail calls, always tries."""


class Backlog:
    """The records of one service on their way to the trail. Thread-safe.

    Bounded: past ``limit`` records waiting, further ones are not kept but counted (by action, with the first
    and last time), and the count is written to the trail after the waiting records, as one ``audit.overflow``
    record of the service, once the trail takes records again. The count is held with the records (one entry
    ``{"overflow": ...}``, replaced as it grows, each time the backlog holds), so a restart keeps it too."""

    def __init__(
        self,
        held: Held,
        write: Callable[[list[Event]], Any],
        log: logging.Logger,
        name: str,
        *,
        limit: int = LIMIT,
    ) -> None:
        """``write``: appends records to the trail, all or none, or raises."""
        self._held = held
        self._write = write
        self.log = log
        self.name = name
        self.limit = limit
        self._lock = threading.Lock()
        self._retry_at = 0.0
        """``time.monotonic()`` before which the trail is not tried again (:data:`RETRY_WAIT`)."""
        self.last_error = ""
        """Why the trail refused the last write."""
        self._overflow: dict[str, Any] = {}
        self._overflow_held: list[int] = []
        """The numbers of the held entries of the count (one, or two after a crash between holding the new
        count and forgetting the old: the later one counts)."""
        self._overflow_saved = 0
        """The count those entries hold."""
        self._waiting: list[_Waiting] = []
        for seq, record in held.held():
            if "overflow" in record:
                self._overflow = dict(record["overflow"])
                self._overflow_held.append(seq)
                self._overflow_saved = self.overflowed
            else:
                self._waiting.append(_Waiting(cast(Event, record["event"]), record["happened"], seq))
        if self._waiting:
            log.warning("%s: %d record(s) held from before wait for the audit trail", name, len(self._waiting))

    @property
    def waiting(self) -> int:
        """Records not yet in the trail."""
        return len(self._waiting)

    def write(self, events: list[Event]) -> bool:
        """Write ``events`` to the trail after those still waiting; False when the trail refused them, or
        refused the last try too recently to be tried again (:data:`RETRY_WAIT`): they wait with the others,
        held."""
        now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        with self._lock:
            room = max(0, self.limit - len(self._waiting))
            self._waiting.extend(_Waiting(event, now) for event in events[:room])
            for event in events[room:]:
                self._count_overflow(event, now)
            return self._write_waiting(retry=False)

    def _checked(self, w: _Waiting) -> _Waiting:
        """``w`` if the trail would take it as it is written; else an ``audit.malformed`` record in its place."""
        try:
            prepare_event(**w.written)
        except RecordError as e:
            self.log.error("%s: a malformed audit record is recorded as %s instead: %s", self.name, MALFORMED, e)
            malformed = Event(
                actor="system",
                action=MALFORMED,
                object=self.name,
                outcome="error",
                details={"action": str(w.event.get("action"))[:200], "error": str(e)[:1000]},
            )
            return w._replace(event=malformed)
        return w

    def _count_overflow(self, event: Event, now: str) -> None:
        if not self._overflow:
            self.log.error(
                "%s: %d records wait for the audit trail, the most kept; further ones are counted, not kept",
                self.name,
                self.limit,
            )
            self._overflow = {"dropped": 0, "actions": {}, "first": now, "limit": self.limit}
        self._overflow["dropped"] += 1
        actions = self._overflow["actions"]
        actions[event["action"]] = actions.get(event["action"], 0) + 1
        self._overflow["last"] = now

    @property
    def overflowed(self) -> int:
        """Records not kept since the backlog was last written (the limit was reached)."""
        return int(self._overflow.get("dropped", 0))

    def flush(self) -> bool:
        """Write the records that wait, now; True when none waits (any more)."""
        with self._lock:
            return self._write_waiting(retry=True)

    def _events(self) -> list[Event]:
        """What is written: the waiting records, in order (``happened`` on those that waited), then the count
        of those not kept."""
        events = [w.written for w in self._waiting]
        if self._overflow:
            events.append(
                Event(actor="system", action=OVERFLOW, object=self.name, outcome="error", details=dict(self._overflow))
            )
        return events

    def _write_waiting(self, *, retry: bool) -> bool:
        """``retry``: try the trail even if it refused the last try less than :data:`RETRY_WAIT` ago."""
        if not self._waiting:
            return True
        began = time.monotonic()
        if not retry and began < self._retry_at:
            self._hold()  # not tried again yet (RETRY_WAIT); the new records are held meanwhile
            return False
        try:
            try:
                self._write(self._events())
            except RecordError:
                # a record the trail refuses for what it is (a writer's bug): it would wait at the head of the
                # backlog for ever and keep every record after it out; it is recorded as malformed instead
                self._waiting = [self._checked(w) for w in self._waiting]
                self._write(self._events())
        except Exception as e:
            self._retry_at = time.monotonic() + RETRY_WAIT * (time.monotonic() - began)
            self.last_error = str(e)
            self.log.error(
                "%s: the audit trail cannot be written (%s); %d record(s) wait for it", self.name, e, self.waiting
            )
            self._hold()
            return False
        self._retry_at = 0.0
        written = [w.held for w in self._waiting if w.held] + self._overflow_held
        self._waiting.clear()
        self._overflow, self._overflow_held, self._overflow_saved = {}, [], 0
        try:
            self._held.drop(written)
        except Exception:
            self.log.exception(
                "%s: %d record(s) now in the audit trail are still held in the database; the service's next "
                "start writes them to the trail again",
                self.name,
                len(written),
            )
        return True

    def _hold(self) -> None:
        self._hold_records()
        self._hold_overflow()

    def _hold_overflow(self) -> None:
        """Hold the count of the records not kept, in place of the count held before (after the new one is
        held: a crash between the two leaves both, and the later one counts)."""
        if self.overflowed == self._overflow_saved:
            return
        try:
            (seq,) = self._held.hold([{"overflow": dict(self._overflow)}])
        except Exception:
            self.log.exception("%s: the count of the records not kept cannot be held in the database", self.name)
            return
        before, self._overflow_held, self._overflow_saved = self._overflow_held, [seq], self.overflowed
        try:
            self._held.drop(before)
        except Exception:  # both stay held (the later counts), and both go once the trail has the count
            self._overflow_held = [*before, seq]
            self.log.exception("%s: the count held before could not be replaced; the later one counts", self.name)

    def _hold_records(self) -> None:
        new = [i for i, w in enumerate(self._waiting) if w.held is None]
        if not new:
            return
        try:
            seqs = self._held.hold(
                [{"event": dict(self._waiting[i].event), "happened": self._waiting[i].happened} for i in new]
            )
        except Exception:
            self.log.exception(
                "%s: the records waiting for the audit trail cannot be held in the database either; they are "
                "lost if the service stops before the trail takes them",
                self.name,
            )
            seqs = [0] * len(new)
        for i, seq in zip(new, seqs, strict=True):
            self._waiting[i] = self._waiting[i]._replace(held=seq)
