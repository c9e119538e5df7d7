"""Today's counts as the gate decides on them: held by the egress service, written to its store behind it.

The egress service is the one writer of its counts (one service per workspace and database). Each user's
day is read from the store once, at the first output of the day (or of the service's life), and kept here:

- a decision and the count it makes are one step under that user's lock (:meth:`Counts.of`), so two outputs
  of one user at the same moment cannot both pass the last of a daily budget;
- no output waits for the database: a writer thread puts the counts into the store in the order they were
  made, those of one user's day that queued up together in one statement, at most :data:`LINGER` seconds
  after they were made (as the audit trail's records are written). The store then holds them as before,
  for the stewards' page, the metrics and the next start of the service.

What a crash of the service loses is the counts of its last moment (at most :data:`LINGER` seconds of
outputs), as a crash of the database server with ``synchronous_commit = off`` would. A stop writes them
all (:meth:`Counts.close`). While the store cannot take them they wait, in order, and are tried again
every :data:`RETRY_SECONDS`; once more than :data:`MAX_WAITING` wait, or the oldest has waited more than
:data:`STALE_SECONDS`, :meth:`Counts.trouble` says so and the service refuses to check outputs until the
store takes them again: a user's server then passes only its small allowance of unchecked bytes, as while
the service is down (``docs/egress.md``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from paitient.services.egress.store import EgressStore

LINGER = 0.05
"""Seconds the writer waits after a count for more to write with it."""
MAX_WAITING = 20_000
"""Counts made and not yet stored beyond which outputs fail closed."""
STALE_SECONDS = 30.0
"""The age of the oldest count not yet stored beyond which outputs fail closed."""
RETRY_SECONDS = 1.0

log = logging.getLogger("paitient.services.egress")


@dataclass
class UserDay:
    """One user's counts for one day, as the gate decides on them."""

    user: str
    day: str
    bytes: int = 0
    outputs: int = 0
    withheld: int = 0
    seen: set[tuple[str, int]] = field(default_factory=set)
    """The distinct (dataset, row) the user saw that day."""

    @property
    def rows(self) -> int:
        return len(self.seen)

    def unseen(self, rows: Mapping[str, Iterable[int]]) -> set[tuple[str, int]]:
        """Which of ``rows`` (dataset -> row ids) the user has not seen yet that day."""
        return {(dataset, int(row)) for dataset, ids in rows.items() for row in ids} - self.seen


@dataclass
class _Waiting:
    """Counts of one user's day not yet in the store."""

    user: str
    day: str
    since: float
    size: int = 0
    outputs: int = 0
    withheld: int = 0
    rows: set[tuple[str, int]] = field(default_factory=set)

    def as_rows(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for dataset, row in sorted(self.rows):
            out.setdefault(dataset, []).append(row)
        return out


class Counts:
    """The users' counts of today, read once from ``store`` and written back to it behind the gate."""

    def __init__(
        self,
        store: EgressStore,
        logger: logging.Logger | None = None,
        *,
        max_waiting: int = MAX_WAITING,
        stale_seconds: float = STALE_SECONDS,
    ):
        self.store = store
        self.log = logger or log
        self.max_waiting = max_waiting
        self.stale_seconds = stale_seconds
        self._days: dict[str, UserDay] = {}
        self._user_locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._waiting: deque[_Waiting] = deque()
        self._queued = 0  # counts (outputs and withheld ones) waiting
        self._cond = threading.Condition()
        self._taken = 0  # how many of the first waiting the writer is storing now (no count joins those)
        self._error = ""
        self._stop = False
        self._writer = threading.Thread(target=self._write_loop, name="egress-counts", daemon=True)
        self._writer.start()

    # -- deciding ----------------------------------------------------------------------------------

    @contextmanager
    def of(self, user: str, day: str) -> Iterator[UserDay]:
        """``user``'s counts of ``day``, theirs alone while the block runs (read from the store the first time)."""
        with self._locks_lock:
            lock = self._user_locks.setdefault(user, threading.Lock())
        with lock:
            known = self._days.get(user)
            if known is None or known.day != day:
                d = self.store.day(user, day)
                known = UserDay(user, day, d.bytes, d.outputs, d.withheld, self.store.revealed(user, day))
                self._days[user] = known
            yield known

    def count(self, today: UserDay, size: int, new: set[tuple[str, int]]) -> None:
        """An output that reached the browser (inside :meth:`of`): its bytes and the rows it showed first."""
        today.bytes += size
        today.outputs += 1
        today.seen |= new
        self._queue(today, size=size, outputs=1, rows=new)

    def count_withheld(self, today: UserDay) -> None:
        today.withheld += 1
        self._queue(today, withheld=1)

    @property
    def waiting(self) -> int:
        """Outputs counted (passed or withheld) and not yet in the store."""
        return self._queued

    def trouble(self) -> str:
        """Why outputs must fail closed now ("" when they need not): the store has not taken counts for too long,
        or too many wait."""
        with self._cond:
            if not self._waiting:
                return ""
            age = time.monotonic() - self._waiting[0].since
            if self._queued > self.max_waiting or age > self.stale_seconds:
                return (
                    f"the egress counts cannot be stored ({self._error or 'the database is too slow'}); "
                    f"{self._queued} wait, the oldest for {age:.0f} s"
                )
        return ""

    # -- writing -----------------------------------------------------------------------------------

    def _queue(self, today: UserDay, *, size: int = 0, outputs: int = 0, withheld: int = 0, rows=()) -> None:
        with self._cond:
            last = self._waiting[-1] if len(self._waiting) > self._taken else None
            if last is None or (last.user, last.day) != (today.user, today.day):
                last = _Waiting(today.user, today.day, time.monotonic())
                self._waiting.append(last)
            last.size += size
            last.outputs += outputs
            last.withheld += withheld
            last.rows.update(rows)
            self._queued += outputs + withheld
            self._cond.notify_all()

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stop:
                    self._cond.wait()
                if not self._waiting:
                    return
            if not self._stop:
                time.sleep(LINGER)  # let the counts of the outputs that follow join this write
            with self._cond:
                batch = list(self._waiting)
                self._taken = len(batch)
            written = 0
            try:
                for waiting in batch:  # in order; one statement per user's day
                    self.store.add_counts(
                        waiting.user,
                        waiting.day,
                        size=waiting.size,
                        outputs=waiting.outputs,
                        withheld=waiting.withheld,
                        rows=waiting.as_rows(),
                    )
                    written += 1
            except Exception as e:
                if not self._error:
                    self.log.error("egress: cannot store the counts (%s); they wait and are tried again", e)
                self._error = str(e)
            finally:
                with self._cond:
                    for waiting in batch[:written]:
                        self._waiting.popleft()
                        self._queued -= waiting.outputs + waiting.withheld
                    self._taken = 0
                    failed = written < len(batch)
                    if not failed and self._error:
                        self.log.info("egress: the counts are stored again")
                        self._error = ""
                    self._cond.notify_all()
            if failed:
                with self._cond:
                    if self._stop:
                        return  # a stop with the store down: what waits is lost, and said so in close()
                    self._cond.wait(RETRY_SECONDS)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every count made so far is stored; False if that took longer than ``timeout``."""
        with self._cond:  # (what is being stored stays in _waiting until stored)
            return self._cond.wait_for(lambda: not self._waiting, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Store what waits, then stop the writer."""
        stored = self.flush(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            lost = self._queued
        self._writer.join(timeout)
        if not stored and lost:
            self.log.error("egress: %d count(s) could not be stored before the service stopped", lost)
