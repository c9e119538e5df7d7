"""The airlock's records on SQLite and PostgreSQL: made by the migrations, an old database kept and stamped,
and a request or decision filed only together with its audit record."""

import sqlite3
import threading
import time

import pytest
import sqlalchemy as sa

from paitient.rules import review
from paitient.services.airlock.store import DAY, Store, TooManyRequests
from paitient.services.kit.db import Location
from tests import legacy_schemas

REQUEST = {
    "project": "oncology",
    "username": "alice",
    "account": "pt-alice",
    "uid": 30001,
    "kind": "table",
    "filename": "cohort.csv",
    "sha256": "ab" * 32,
    "size": 12,
    "justification": "table 1 of the paper",
    "meta": {"rows": 3},
}


@pytest.fixture
def store(tmp_path, database):
    where = Location(
        tmp_path / "airlock" / "airlock.db", database.get("url", ""), "airlock", database.get("passfile", "")
    )
    store = Store(tmp_path / "airlock", where)
    yield store
    store.close()


def test_nothing_is_filed_when_the_audit_record_cannot_be_written(store):
    def audit_down(_):
        raise OSError("the trail cannot be written")

    with pytest.raises(OSError, match="trail"):
        store.create(**REQUEST, before_commit=audit_down)
    assert store.list() == []
    req = store.create(**REQUEST)
    store.transition(req.id, review.CHECKING, actor="airlock")
    store.transition(req.id, review.IN_REVIEW, actor="airlock")
    with pytest.raises(OSError, match="trail"):
        store.decide(
            req.id,
            reviewer="sam",
            action="approve",
            comment="fine",
            may_review=True,
            approvals_needed=1,
            before_commit=audit_down,
        )
    assert store.get(req.id).state == review.IN_REVIEW
    assert [e.type for e in store.events(req.id)] == ["state", "state", "state"]
    decision = store.decide(
        req.id, reviewer="sam", action="approve", comment="fine", may_review=True, approvals_needed=1
    )
    assert decision.new_state == review.RELEASED and store.get(req.id).state == review.RELEASED
    assert [r.id for r in store.list(projects=["oncology"], states_=[review.RELEASED])] == [req.id]
    assert store.list(projects=[]) == [] and store.list(projects=[], username="alice")[0].id == req.id


def test_a_user_files_at_most_their_daily_requests_even_all_at_once(store):
    """Eight filings at once with three left: three are filed, five refused, on SQLite and PostgreSQL alike;
    another user is not held back, and a request filed over 24 hours ago no longer counts."""
    first = store.create(**REQUEST, per_day=4)
    filed: list[str] = []
    refused: list[TooManyRequests] = []
    go = threading.Barrier(8)

    def file() -> None:
        go.wait()
        try:
            filed.append(store.create(**REQUEST, per_day=4).id)
        except TooManyRequests as e:
            refused.append(e)

    threads = [threading.Thread(target=file) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(filed), len(refused)) == (3, 5)
    assert len(store.list(username="alice")) == 4
    e = refused[0]
    assert (e.filed, e.limit) == (4, 4) and e.next_at == pytest.approx(first.created + DAY)
    assert "filed 4 airlock requests in the last 24 hours" in str(e) and "requests_per_day = 4" in str(e)
    assert time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(first.created + DAY + 60)) in str(e)
    with pytest.raises(TooManyRequests):
        store.may_file("alice", 4)
    store.may_file("alice", 5)
    assert store.create(**{**REQUEST, "username": "bob"}, per_day=4).username == "bob"
    # The oldest leaves the window: one more may be filed, and only one.
    with store.db.transaction() as db:
        db.execute(
            sa.text("UPDATE requests SET created = :t WHERE id = :id"), {"t": time.time() - DAY - 1, "id": first.id}
        )
    store.may_file("alice", 4)
    store.create(**REQUEST, per_day=4)
    with pytest.raises(TooManyRequests):
        store.create(**REQUEST, per_day=4)


@pytest.mark.parametrize("with_count_tables", [False, True], ids=["before-checks", "after-checks"])
def test_a_sqlite_airlock_from_before_migrations_is_stamped_not_made_anew(tmp_path, with_count_tables):
    path = tmp_path / "airlock" / "airlock.db"
    legacy_schemas.make_sqlite(path, legacy_schemas.AIRLOCK)
    with sqlite3.connect(path) as db:
        if with_count_tables:
            db.executescript(legacy_schemas.AIRLOCK_COUNT_TABLES)
        db.execute(
            "INSERT INTO requests VALUES ('20260101-aaaa', 'oncology', 'alice', 'pt-alice', 30001, 'table', "
            "'old.csv', ?, 5, 'old', '{}', 'released', 1.0, 2.0)",
            ("cd" * 32,),
        )
        db.execute(
            "INSERT INTO events (request_id, ts, actor, type, data) VALUES ('20260101-aaaa', 1.0, 'alice', "
            "'state', '{\"to\": \"submitted\"}')"
        )
    store = Store(tmp_path / "airlock")
    assert store.get("20260101-aaaa").state == "released"
    assert [e.actor for e in store.events("20260101-aaaa")] == ["alice"]
    store.record_download("20260101-aaaa", actor="alice", data={"bytes": 5})
    new = store.create(**REQUEST)
    assert store.events(new.id)[0].seq == 3  # the old rows' sequence goes on
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0003",)]
        assert {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} >= {
            "requests",
            "events",
            "count_tables",
        }
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("DELETE FROM events")
