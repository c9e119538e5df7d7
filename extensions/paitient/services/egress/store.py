"""The egress service's counts: what reached each user's browser today.

Two tables: ``usage`` (user, day -> bytes received, outputs passed, outputs withheld) and ``revealed``
(user, day, dataset, row: the distinct dataset rows a user saw that day). A day is a UTC date. They are in
``<state_dir>/egress/egress.sqlite3`` (directory 0700, file 0600, root only; WAL, ``synchronous=NORMAL``),
or with ``[database] url`` in the schema ``egress`` of that PostgreSQL database; the migrations in
``migrations/versions`` make and upgrade them (an ``egress.sqlite3`` from before the migrations is
recognised and stamped; see :mod:`paitient.services.kit.db`). Counts survive a restart of the service and a
crash mid-write (a write is one transaction, on disk or not at all), so neither a new websocket nor a
restarted server renews a user's day.

The egress service reads a user's day from this store once (:meth:`EgressStore.day`,
:meth:`EgressStore.revealed`, at the user's first output of the day) and then writes the counts it makes
behind its answers, those of one user's day that queued up together at once (:meth:`EgressStore.add_counts`;
:mod:`paitient.services.egress.counts`); each call takes a pooled connection of the store's engine and speaks
to the driver directly: one statement where one answers. Every write is an increment or an insert of rows not
yet there, which the database keeps exact under concurrent writers on its own (SQLite: ``BEGIN IMMEDIATE``;
PostgreSQL: ``INSERT .. ON CONFLICT``, one statement); no write first reads what it then writes, so the
table lock :meth:`~paitient.services.kit.db.Database.transaction` takes on PostgreSQL is not needed here.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from paitient.services.kit.db import Database, Location

MIGRATIONS = Path(__file__).parent / "migrations"
TABLES = {
    "usage": ("user", "day", "bytes", "outputs", "withheld"),
    "revealed": ("user", "day", "dataset", "row"),
}
"""The tables and their columns as the first migration makes them (and the store made them before)."""


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


WRITER_LOCK = 0x7061_6974_6567_7201  # "paitegr" and 1: the advisory lock key of the one writer (PostgreSQL)


class StoreBusy(RuntimeError):
    """Another egress service writes these counts already; the message says which store."""


T = TypeVar("T")
_PARAM = re.compile(r"(?<![:\w]):(\w+)")


class _Statements:
    """The store's SQL in the driver's own parameter style (``:name`` for sqlite3, ``%(name)s`` for psycopg):
    written once with ``:name``, ``"user"`` and ``"row"`` quoted (reserved words on PostgreSQL)."""

    def __init__(self, postgres: bool):
        def sql(text: str) -> str:
            return _PARAM.sub(r"%(\1)s", text) if postgres else text

        day_columns = (
            "SELECT COALESCE(u.bytes, 0), COALESCE(u.outputs, 0), COALESCE(u.withheld, 0), "
            '(SELECT COUNT(*) FROM revealed WHERE "user" = :user AND day = :day)'
        )
        of_day = ' FROM (SELECT 1 AS one) AS one LEFT JOIN usage u ON u."user" = :user AND u.day = :day'
        self.day = sql(day_columns + of_day)
        self.totals = sql(
            # (PostgreSQL's SUM of BIGINT is NUMERIC, a Decimal in Python: cast back)
            "SELECT COUNT(*), CAST(COALESCE(SUM(bytes), 0) AS BIGINT), CAST(COALESCE(SUM(outputs), 0) AS BIGINT), "
            "CAST(COALESCE(SUM(withheld), 0) AS BIGINT) FROM usage WHERE day = :day"
        )
        history = (
            'SELECT u."user", u.day, u.bytes, u.outputs, u.withheld, '
            '(SELECT COUNT(*) FROM revealed r WHERE r."user" = u."user" AND r.day = u.day) FROM usage u'
        )
        order = ' ORDER BY u.day DESC, u."user"'
        self.history = sql(history + order)
        self.history_of = sql(history + ' WHERE u."user" = :user' + order)
        count = (
            'INSERT INTO usage ("user", day, bytes, outputs, withheld) '
            "VALUES (:user, :day, :size, :outputs, :withheld) "
            'ON CONFLICT ("user", day) DO UPDATE SET bytes = usage.bytes + excluded.bytes, '
            "outputs = usage.outputs + excluded.outputs, withheld = usage.withheld + excluded.withheld"
        )
        self.count = sql(count)
        # PostgreSQL: the output's count and its rows in one statement (atomic on its own). The usage row is
        # written first (the rows are joined to its RETURNING), then the rows in one order, so two writers of
        # one user's day queue on the usage row and never wait for each other's rows.
        self.count_rows = sql(
            f"WITH counted AS ({count} RETURNING 1) "  # noqa: S608 -- fixed SQL
            'INSERT INTO revealed ("user", day, dataset, "row") '
            'SELECT :user, :day, w.dataset, w."row" FROM counted, '
            'unnest(CAST(:datasets AS TEXT[]), CAST(:rows AS BIGINT[])) AS w(dataset, "row") '
            'ORDER BY w.dataset, w."row" ON CONFLICT DO NOTHING'
        )
        self.reveal = 'INSERT OR IGNORE INTO revealed ("user", day, dataset, "row") VALUES (?, ?, ?, ?)'  # SQLite
        self.revealed = sql('SELECT dataset, "row" FROM revealed WHERE "user" = :user AND day = :day')


class EgressStore:
    """Safe to use from several threads (the service answers many users' servers from threads): a pooled
    connection per call."""

    def __init__(self, path: str | os.PathLike[str], database: Location | None = None):
        """The counts in ``database`` (default: SQLite at ``path``, its folder made root 0700)."""
        self.path = Path(path)
        where = database or Location(self.path)
        if not where.postgres:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.path.parent, 0o700)
        # No ping before each call on PostgreSQL (a round trip each): _run retries a call whose connection
        # the server dropped instead.
        self.db = Database(
            where, what="egress counts", migrations=MIGRATIONS, tables=TABLES, synchronous="NORMAL", pre_ping=False
        )
        self.postgres = self.db.postgres
        self._sql = _Statements(self.postgres)

    @classmethod
    def for_site(cls, site: Any) -> EgressStore:
        """The site's counts: in ``[database] url``'s schema ``egress``, or the SQLite file under its state_dir."""
        path = db_path(site.state_dir)
        return cls(path, Location.for_site(site, "egress", path))

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def sole_writer(self, wait: float = 0.0) -> Iterator[None]:
        """Hold, while the block runs, the claim to be the one egress service writing these counts, or raise
        :class:`StoreBusy` when another holds it for ``wait`` seconds more (a service that a restart replaces
        may still be storing its last counts): the service decides on the counts it holds in memory
        (:mod:`.counts`), which a second writer would make wrong. PostgreSQL: a session advisory lock on a
        connection of its own, held for the block (it ends with the session, a crash included); SQLite: an
        exclusive ``flock`` of ``<file>.writer`` (it ends with the process)."""

        def claimed(attempt: Callable[[], bool]) -> bool:
            deadline = time.monotonic() + wait
            while not attempt():
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.2)
            return True

        if self.postgres:
            pooled = self.db.engine.raw_connection()
            conn: Any = pooled.driver_connection
            try:
                if not claimed(lambda: conn.execute("SELECT pg_try_advisory_lock(%s)", (WRITER_LOCK,)).fetchone()[0]):
                    raise StoreBusy(
                        "another egress service writes the counts in this database already (schema egress of "
                        "[database] url); run one egress service per workspace database"
                    )
                yield
            finally:
                pooled.invalidate()  # the session ends, and its advisory lock with it
                pooled.close()
            return
        fd = os.open(self.path.with_name(self.path.name + ".writer"), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)

        def flock() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        try:
            if not claimed(flock):
                raise StoreBusy(
                    f"another egress service writes the counts in {self.path} already; run one egress service per "
                    "state directory"
                )
            yield
        finally:
            os.close(fd)  # (the lock goes with the descriptor)

    def _run(self, work: Callable[[Any], T], transaction: bool = False) -> T:
        """``work(connection)`` on a pooled driver connection in autocommit mode (a statement alone is atomic);
        ``transaction``: its statements as one, ``BEGIN IMMEDIATE`` (SQLite), rolled back on any exception.

        A connection the server dropped (PostgreSQL restarted, or ended it) is found here rather than by a
        ping before every call: the pool is renewed (its idle connections are as old) and the call runs once
        more on a new connection. A write that reached the server before the connection dropped is then
        counted twice, which only makes the user's limits stricter; never counted is what must not happen."""
        for attempt in (1, 2):
            pooled = self.db.engine.raw_connection()
            conn: Any = pooled.driver_connection
            try:
                if not transaction:
                    return work(conn)
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = work(conn)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                return result
            except self.db.engine.dialect.loaded_dbapi.Error as e:
                if not self.db.engine.dialect.is_disconnect(e, conn, None):
                    raise
                pooled.invalidate()
                self.db.engine.dispose()  # a new pool: its idle connections are as old
                if attempt == 2:
                    raise
            finally:
                pooled.close()  # back to the pool (an invalidated one is closed)
        raise AssertionError("unreachable")

    # -- reading -----------------------------------------------------------------------------------

    def day(self, user: str, day: str) -> Day:
        params = {"user": user, "day": day}
        b, o, w, rows = self._run(lambda db: db.execute(self._sql.day, params).fetchone())  # every output asks
        return Day(user, day, b, o, w, rows)

    def totals(self, day: str) -> Totals:
        """The day's counts over every user: users with counts, bytes, outputs passed and withheld."""
        users, b, o, w = self._run(lambda db: db.execute(self._sql.totals, {"day": day}).fetchone())
        return Totals(day, users, b, o, w)

    def history(self, days: int = 30, user: str | None = None) -> list[Day]:
        """Per user and day, newest first, the last ``days`` days that have counts."""
        if user is None:
            found = self._run(lambda db: db.execute(self._sql.history).fetchall())
        else:
            found = self._run(lambda db: db.execute(self._sql.history_of, {"user": user}).fetchall())
        newest = sorted({d for _, d, *_ in found}, reverse=True)[:days]
        return [Day(*r) for r in found if r[1] in newest]

    # -- writing -----------------------------------------------------------------------------------

    def revealed(self, user: str, day: str) -> set[tuple[str, int]]:
        """The distinct (dataset, row) the user saw on ``day``."""
        found = self._run(lambda db: db.execute(self._sql.revealed, {"user": user, "day": day}).fetchall())
        return {(str(dataset), int(row)) for dataset, row in found}

    # -- writing -----------------------------------------------------------------------------------

    def add(self, user: str, day: str, *, size: int, rows: Mapping[str, Iterable[int]]) -> None:
        """Count one output that reached the browser: its bytes, and the rows it showed (each distinct row
        once a day, however often it is shown)."""
        self.add_counts(user, day, size=size, outputs=1, rows=rows)

    def add_withheld(self, user: str, day: str) -> None:
        self.add_counts(user, day, withheld=1)

    def add_counts(
        self,
        user: str,
        day: str,
        *,
        size: int = 0,
        outputs: int = 0,
        withheld: int = 0,
        rows: Mapping[str, Iterable[int]] | None = None,
    ) -> None:
        """Add to one user's day at once: ``outputs`` that reached the browser with ``size`` bytes among them,
        ``withheld`` outputs, and the ``rows`` they showed (dataset -> row ids; each distinct row once)."""
        shown = sorted({(dataset, int(row)) for dataset, ids in (rows or {}).items() for row in ids})
        counted = {"user": user, "day": day, "size": int(size), "outputs": int(outputs), "withheld": int(withheld)}
        if self.postgres:  # one statement, with or without rows
            counted |= {"datasets": [d for d, _ in shown], "rows": [r for _, r in shown]}
            self._run(lambda db: db.execute(self._sql.count_rows, counted))
        elif not shown:  # most outputs show no rows: one statement
            self._run(lambda db: db.execute(self._sql.count, counted))
        else:

            def count(db: Any) -> None:
                db.execute(self._sql.count, counted)
                db.executemany(self._sql.reveal, [(user, day, d, r) for d, r in shown])

            self._run(count, transaction=True)
