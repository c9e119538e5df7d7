"""The egress counts store, on SQLite and on PostgreSQL: where it keeps the counts, that each distinct row
counts once a day however many writers add it, and a database from before the migrations."""

from __future__ import annotations

import json
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest

from paitient.services.egress.store import Day, EgressStore, StoreBusy, Totals, db_path
from paitient.services.kit.db import DatabaseError, Location
from tests import legacy_schemas


@pytest.fixture
def site(database_site):
    """A site whose counts are in the parametrised database (SQLite under its state_dir, then PostgreSQL)."""
    return database_site


@pytest.fixture
def open_store(site, opened_stores):
    """Opens the site's counts as the service does (``EgressStore.for_site``); every store opened is closed after."""
    return lambda: opened_stores(EgressStore.for_site(site))


def test_the_counts_are_where_the_site_says(site, open_store):
    store = open_store()
    store.add("alice", "2026-12-04", size=10, rows={"onc/bc": [7]})
    path = db_path(site.state_dir)
    if not site.database.url:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_uid == 0
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0002",)]
            assert db.execute("SELECT * FROM usage").fetchall() == [("alice", "2026-12-04", 10, 1, 0)]
            assert db.execute("SELECT * FROM revealed").fetchall() == [("alice", "2026-12-04", "onc/bc", 7)]
    else:
        assert not path.exists()  # nothing of the counts in SQLite
        with psycopg.connect(site.database.url, passfile=site.database.passfile) as conn:
            assert conn.execute("SELECT version_num FROM egress.alembic_version").fetchall() == [("0002",)]
            assert conn.execute("SELECT * FROM egress.usage").fetchall() == [("alice", "2026-12-04", 10, 1, 0)]
            assert conn.execute("SELECT * FROM egress.revealed").fetchall() == [("alice", "2026-12-04", "onc/bc", 7)]


def unseen(store: EgressStore, user: str, day: str, rows) -> int:
    """How many of ``rows`` (dataset -> ids) the user had not seen on ``day``, by the store's rows of the day."""
    return len({(dataset, int(row)) for dataset, ids in rows.items() for row in ids} - store.revealed(user, day))


def test_the_store_counts_the_distinct_rows_not_seen_yet(open_store):
    store = open_store()
    assert store.day("alice", "2026-01-02") == Day("alice", "2026-01-02")  # no usage yet: zeros
    store.add("alice", "2026-01-02", size=10, rows={"onc/bc": range(0, 1200, 2)})
    store.add("bob", "2026-01-02", size=10, rows={"onc/bc": range(1200)})  # another user's rows
    store.add("alice", "2026-01-01", size=10, rows={"onc/bc": range(1200)})  # another day's
    asked = {"onc/bc": [*range(1200), 5, 7, 1198], "onc/gbsg": [1, 2, 2]}
    # of 0..1199 the even ones were seen: 600 odd ones (5 and 7 once), and 2 of the other dataset
    assert unseen(store, "alice", "2026-01-02", asked) == 600 + 2
    assert unseen(store, "alice", "2026-01-02", {"onc/bc": []}) == 0 and unseen(store, "alice", "2026-01-02", {}) == 0
    assert store.day("alice", "2026-01-02") == Day("alice", "2026-01-02", bytes=10, outputs=1, rows=600)
    # a row shown again counts once; rows of another dataset and outputs without rows add up
    store.add("alice", "2026-01-02", size=5, rows={"onc/bc": [0, 2, 2, 1], "onc/gbsg": [1]})
    store.add("alice", "2026-01-02", size=7, rows={})
    store.add_withheld("alice", "2026-01-02")
    assert store.day("alice", "2026-01-02") == Day("alice", "2026-01-02", 22, 3, 1, 602)
    assert unseen(store, "alice", "2026-01-02", asked) == 599 + 1
    # several outputs of one user's day at once (as the service writes what queued up): one call
    store.add_counts("alice", "2026-01-02", size=100, outputs=4, withheld=2, rows={"onc/bc": [1, 3, 3]})
    assert store.day("alice", "2026-01-02") == Day("alice", "2026-01-02", 122, 7, 3, 603)
    assert unseen(store, "alice", "2026-01-02", asked) == 598 + 1
    assert unseen(store, "carol", "2026-01-02", {"onc/bc": [4, 4, 9]}) == 2


def test_totals_and_history(open_store):
    store = open_store()
    store.add("alice", "2026-12-01", size=2**40, rows={"onc/bc": [1, 2]})  # beyond 32 bits
    store.add("bob", "2026-12-01", size=5, rows={})
    store.add_withheld("bob", "2026-12-01")
    store.add("alice", "2026-12-02", size=3, rows={"onc/bc": [1]})
    store.add_withheld("carol", "2026-12-03")
    totals = store.totals("2026-12-01")
    assert totals == Totals("2026-12-01", users=2, bytes=2**40 + 5, outputs=2, withheld=1)
    assert all(type(v) is int for v in (totals.users, totals.bytes, totals.outputs, totals.withheld))
    assert store.totals("2026-11-30") == Totals("2026-11-30")
    assert store.history() == [
        Day("carol", "2026-12-03", withheld=1),
        Day("alice", "2026-12-02", 3, 1, 0, 1),
        Day("alice", "2026-12-01", 2**40, 1, 0, 2),
        Day("bob", "2026-12-01", 5, 1, 1, 0),
    ]
    assert store.history(days=1) == [Day("carol", "2026-12-03", withheld=1)]
    assert [(d.user, d.day) for d in store.history(user="alice")] == [("alice", "2026-12-02"), ("alice", "2026-12-01")]


def test_counts_survive_closing_and_opening_again(open_store):
    store = open_store()
    store.add("alice", "2026-12-04", size=100, rows={"onc/bc": range(30)})
    store.close()  # the service stops
    again = open_store()
    assert again.day("alice", "2026-12-04") == Day("alice", "2026-12-04", 100, 1, 0, 30)
    assert unseen(again, "alice", "2026-12-04", {"onc/bc": range(40)}) == 10


def test_writers_on_two_stores_count_each_distinct_row_once(open_store):
    """8 threads on two stores (two engines, as two service processes would have) add outputs that show
    overlapping rows of one user's day at once: every output is counted, every distinct row exactly once."""
    stores = [open_store(), open_store()]
    day = "2026-12-04"
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(25):
                first = (i * 25 + j) * 5  # each output shows 20 rows, 15 of them also the next output's
                rows = {"onc/bc": range(first, first + 20), "onc/gbsg": [j % 3]}
                stores[i % 2].add("alice", day, size=1000 + i, rows=rows)
                stores[(i + 1) % 2].add_withheld("alice", day)
        except BaseException as e:  # noqa: BLE001 -- reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and not any(t.is_alive() for t in threads)
    distinct = len(set(range(0, 8 * 25 * 5 + 15))) + 3  # rows 0 .. the last output's, and 3 of gbsg
    expected = Day("alice", day, sum(25 * (1000 + i) for i in range(8)), 8 * 25, 8 * 25, distinct)
    assert stores[0].day("alice", day) == expected == stores[1].day("alice", day)
    assert unseen(stores[1], "alice", day, {"onc/bc": range(-5, 1020), "onc/gbsg": range(4)}) == 5 + 5 + 1


def _old_counts(path: Path) -> None:
    """An ``egress.sqlite3`` as the store made it before migrations, with a day of counts."""
    legacy_schemas.make_sqlite(path, legacy_schemas.EGRESS)
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO usage (user, day, bytes, outputs, withheld) VALUES ('alice', '2026-12-03', 500, 4, 2)")
        db.executemany(
            "INSERT INTO revealed (user, day, dataset, row) VALUES ('alice', '2026-12-03', 'onc/bc', ?)",
            [(r,) for r in range(12)],
        )


def test_counts_from_before_migrations_are_stamped_and_kept(tmp_path):
    path = db_path(tmp_path)
    _old_counts(path)
    store = EgressStore(path)
    try:
        assert store.day("alice", "2026-12-03") == Day("alice", "2026-12-03", 500, 4, 2, 12)
        assert unseen(store, "alice", "2026-12-03", {"onc/bc": range(15)}) == 3
        store.add("alice", "2026-12-03", size=1, rows={"onc/bc": [11, 12]})
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0002",)]
        assert db.execute("SELECT bytes, outputs, withheld FROM usage").fetchall() == [(501, 5, 2)]
        assert db.execute("SELECT COUNT(*) FROM revealed").fetchall() == [(13,)]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    store = EgressStore(path)  # opened again: simply at the newest revision
    try:
        assert store.day("alice", "2026-12-03").rows == 13
    finally:
        store.close()


def test_a_usage_table_this_store_did_not_make_is_refused(tmp_path):
    path = db_path(tmp_path)
    legacy_schemas.make_sqlite(
        path,
        (
            "CREATE TABLE usage (user TEXT, day TEXT, bytes INTEGER, PRIMARY KEY (user, day))",
            legacy_schemas.EGRESS[1],
        ),
    )
    with pytest.raises(DatabaseError, match="table usage has columns bytes, day, user, not the .* restore it from"):
        EgressStore(path)
    with sqlite3.connect(path) as db:  # left as it was
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'alembic_version'").fetchall() == []


def test_a_database_with_only_one_of_the_tables_is_refused(tmp_path):
    path = db_path(tmp_path)
    legacy_schemas.make_sqlite(path, legacy_schemas.EGRESS[:1])
    with pytest.raises(DatabaseError, match="holds usage but not revealed and no alembic_version"):
        EgressStore(path)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall() == [("usage",)]


def test_a_connection_the_server_ended_is_replaced_and_the_call_still_counts(tmp_path, postgres_db):
    """No ping before each call: when PostgreSQL ends the store's connections (a restart does the same), the
    next calls find out, take new connections and are counted; nothing is lost."""
    store = EgressStore(db_path(tmp_path), Location(db_path(tmp_path), postgres_db.url, "egress", postgres_db.passfile))
    try:
        for _ in range(3):  # a few connections in the pool
            store.add("alice", "2026-12-04", size=1, rows={"onc/bc": [1]})
        with psycopg.connect(postgres_db.url, passfile=postgres_db.passfile, autocommit=True) as admin:
            ended = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
        assert ended and all(ok for (ok,) in ended)
        assert store.day("alice", "2026-12-04") == Day("alice", "2026-12-04", 3, 3, 0, 1)
        with psycopg.connect(postgres_db.url, passfile=postgres_db.passfile, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        store.add("alice", "2026-12-04", size=1, rows={"onc/bc": [2]})  # a write after the connections ended
        store.add_withheld("alice", "2026-12-04")
        assert store.day("alice", "2026-12-04") == Day("alice", "2026-12-04", 4, 4, 1, 2)
    finally:
        store.close()


def test_the_counts_are_written_as_durably_on_either_backend(site, open_store):
    """SQLite's ``synchronous=NORMAL`` (a power loss may take the last commits, never half of one) and, on
    PostgreSQL, ``synchronous_commit = off`` (a crash of the server may): the gate's writes do not wait for the
    disk. Another store of the same database (the ledger's) still waits for it."""
    from paitient.services.ledger.store import Ledger

    store = open_store()
    store.add("alice", "2026-12-04", size=1, rows={})
    with store.db.engine.connect() as conn:
        if store.postgres:
            assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "off"
        else:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    ledger = Ledger(site)
    try:
        with ledger.db.engine.connect() as conn:
            if ledger.db.postgres:
                assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
            else:
                assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    finally:
        ledger.close()
    assert store.day("alice", "2026-12-04").outputs == 1


HOLDER = """
import json, sys, time
from paitient.config import parse
from paitient.services.egress.store import EgressStore
site = parse(json.loads(sys.argv[1]))
store = EgressStore.for_site(site)
with store.sole_writer():
    print("holding", flush=True)
    time.sleep(600)
"""


def test_one_egress_service_at_a_time_writes_the_counts_and_a_crashed_one_lets_go(site, open_store):
    """The service decides on the counts it holds in memory: a second writer would make them wrong. Its claim
    is refused while another process holds it, and freed when that process is killed (kill -9)."""
    table = {"workspace": {"state_dir": str(site.state_dir)}}
    if site.database.url:
        table["database"] = {"url": site.database.url, "passfile": site.database.passfile}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, json.dumps(table)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "holding\n", holder.stderr.read()
        with pytest.raises(StoreBusy, match="another egress service writes the counts"):
            with open_store().sole_writer():
                pass
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # (PostgreSQL ends the killed session's lock once it notices the session gone: a starting service waits)
    with open_store().sole_writer(wait=30):
        pass
    # and within one process, a second claim is refused too
    first = open_store()
    with first.sole_writer():
        with pytest.raises(StoreBusy):
            with open_store().sole_writer():
                pass
