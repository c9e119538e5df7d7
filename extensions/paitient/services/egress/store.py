"""The egress service's counts: what reached each user's browser today.

SQLite at ``<state_dir>/egress/egress.sqlite3`` (directory 0700, file 0600, root only), WAL mode. Two
tables: ``usage`` (user, day -> bytes received, outputs passed, outputs withheld) and ``revealed`` (user,
day, dataset, row: the distinct dataset rows a user saw that day). A day is a UTC date. Counts survive a
restart of the service and a crash mid-write (a transaction is on disk or not at all), so neither a new
websocket nor a restarted server renews a user's day.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from paitient.services.kit.sqlite import write_transaction

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS usage (
        user TEXT NOT NULL,
        day TEXT NOT NULL,
        bytes INTEGER NOT NULL DEFAULT 0,
        outputs INTEGER NOT NULL DEFAULT 0,
        withheld INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (user, day))""",
    """CREATE TABLE IF NOT EXISTS revealed (
        user TEXT NOT NULL,
        day TEXT NOT NULL,
        dataset TEXT NOT NULL,
        row INTEGER NOT NULL,
        PRIMARY KEY (user, day, dataset, row)) WITHOUT ROWID""",
)


def today(now: dt.datetime | None = None) -> str:
    """The day a count belongs to: the UTC date, ``YYYY-MM-DD``."""
    return (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%d")


def db_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / "egress" / "egress.sqlite3"


@dataclass(frozen=True)
class Day:
    """One user's counts for one day."""

    user: str
    day: str
    bytes: int = 0
    outputs: int = 0
    withheld: int = 0
    rows: int = 0


@dataclass(frozen=True)
class Totals:
    """All users' counts for one day together."""

    day: str
    users: int = 0
    bytes: int = 0
    outputs: int = 0
    withheld: int = 0


class EgressStore:
    """Thread-safe: one connection, one lock (the service answers many users' servers from threads)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        os.chmod(self.path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        for statement in SCHEMA:
            self._db.execute(statement)

    @classmethod
    def for_state_dir(cls, state_dir: str | os.PathLike[str]) -> EgressStore:
        return cls(db_path(state_dir))

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return write_transaction(self._db, self._lock)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- reading -----------------------------------------------------------------------------------

    def day(self, user: str, day: str) -> Day:
        with self._lock:  # one statement: every output asks
            b, o, w, rows = self._db.execute(
                "SELECT COALESCE(u.bytes, 0), COALESCE(u.outputs, 0), COALESCE(u.withheld, 0), "
                "(SELECT COUNT(*) FROM revealed WHERE user = ?1 AND day = ?2) "
                "FROM (SELECT 1) LEFT JOIN usage u ON u.user = ?1 AND u.day = ?2",
                (user, day),
            ).fetchone()
        return Day(user, day, b, o, w, rows)

    def totals(self, day: str) -> Totals:
        """The day's counts over every user: users with counts, bytes, outputs passed and withheld."""
        with self._lock:
            users, b, o, w = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0), COALESCE(SUM(outputs), 0), COALESCE(SUM(withheld), 0) "
                "FROM usage WHERE day = ?",
                (day,),
            ).fetchone()
        return Totals(day, users, b, o, w)

    def unseen(self, user: str, day: str, rows: Mapping[str, Iterable[int]]) -> int:
        """How many of the distinct ``rows`` (dataset -> row ids) the user has not seen yet on ``day``: one
        statement per dataset, the ids passed as one JSON array (an output with rows asks this every time)."""
        n = 0
        with self._lock:
            for dataset, ids in rows.items():
                wanted = sorted({int(row) for row in ids})
                if not wanted:
                    continue
                (seen,) = self._db.execute(
                    "SELECT COUNT(*) FROM revealed WHERE user = ? AND day = ? AND dataset = ? "
                    "AND row IN (SELECT value FROM json_each(?))",
                    (user, day, dataset, json.dumps(wanted)),
                ).fetchone()
                n += len(wanted) - seen
        return n

    def history(self, days: int = 30, user: str | None = None) -> list[Day]:
        """Per user and day, newest first, the last ``days`` days that have counts."""
        with self._lock:
            found = self._db.execute(
                "SELECT u.user, u.day, u.bytes, u.outputs, u.withheld, "
                "(SELECT COUNT(*) FROM revealed r WHERE r.user = u.user AND r.day = u.day) "
                "FROM usage u WHERE (? IS NULL OR u.user = ?) ORDER BY u.day DESC, u.user",
                (user, user),
            ).fetchall()
        newest = sorted({d for _, d, *_ in found}, reverse=True)[:days]
        return [Day(*r) for r in found if r[1] in newest]

    # -- writing -----------------------------------------------------------------------------------

    def add(self, user: str, day: str, *, size: int, rows: Mapping[str, Iterable[int]]) -> None:
        """Count one output that reached the browser: its bytes, and the rows it showed."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO usage (user, day, bytes, outputs) VALUES (?, ?, ?, 1) "
                "ON CONFLICT (user, day) DO UPDATE SET bytes = bytes + excluded.bytes, outputs = outputs + 1",
                (user, day, int(size)),
            )
            db.executemany(
                "INSERT OR IGNORE INTO revealed (user, day, dataset, row) VALUES (?, ?, ?, ?)",
                ((user, day, dataset, int(row)) for dataset, ids in rows.items() for row in ids),
            )

    def add_withheld(self, user: str, day: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO usage (user, day, withheld) VALUES (?, ?, 1) "
                "ON CONFLICT (user, day) DO UPDATE SET withheld = withheld + 1",
                (user, day),
            )
