"""The ledger's storage on a real SQLite file: reservations, settlement, lost runs, overrides, lookups."""

import os
import sqlite3
import stat
import threading

import psycopg
import pytest
import sqlalchemy

from paitient.rules.budget import BudgetExceeded
from paitient.services.kit.db import DatabaseError
from paitient.services.ledger.store import Ledger, LedgerError, db_path
from tests import legacy_schemas
from tests.ledger.conftest import make_site

SHA = "ab" * 32


def test_database_is_root_only(state_dir):
    site = make_site(state_dir)  # SQLite
    Ledger(site).close()
    path = db_path(site)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.stat().st_uid == 0


def test_reserve_settle_releases_the_rest(ledger):
    row = ledger.reserve("oncology", "breast_cancer", 3.0, 1e-6, user="alice", run_id="r1", pid=os.getpid())
    b = {x["dataset"]: x for x in ledger.budget("oncology")}["breast_cancer"]
    assert (b["epsilon_reserved"], b["epsilon_spent"], b["epsilon_left"]) == (3.0, 0.0, 7.0)
    done = ledger.settle(row, 2.25, record={"weights_sha256": SHA, "steps": 40}, user="alice")
    assert done["state"] == "settled" and done["delta_spent"] == 1e-6
    b = {x["dataset"]: x for x in ledger.budget("oncology")}["breast_cancer"]
    assert (b["epsilon_reserved"], b["epsilon_spent"], b["epsilon_left"]) == (0.0, 2.25, 7.75)
    assert ledger.record_by_hash(SHA.upper())["record"] == {"weights_sha256": SHA, "steps": 40}
    assert ledger.record_by_hash("cd" * 32) is None


def test_refused_when_exhausted_with_numbers(ledger):
    ledger.reserve("oncology", "gbsg2", 1.5, 1e-7, user="alice")
    with pytest.raises(BudgetExceeded, match=r"epsilon 1 asked, but oncology/gbsg2 has 0.5 left of 2"):
        ledger.reserve("oncology", "gbsg2", 1.0, 1e-7, user="alice")
    # the other dataset has its own budget
    ledger.reserve("oncology", "breast_cancer", 1.0, 1e-7, user="alice")


def test_unknown_project_and_dataset_are_refused(ledger):
    with pytest.raises(LedgerError, match="no project 'nope'"):
        ledger.reserve("nope", "x", 1.0, 1e-7, user="a")
    with pytest.raises(LedgerError, match="has no dataset 'diabetes'; its datasets: breast_cancer, gbsg2"):
        ledger.reserve("oncology", "diabetes", 1.0, 1e-7, user="a")


def test_settle_rules(ledger):
    row = ledger.reserve("oncology", "breast_cancer", 1.0, 1e-6, user="alice")
    with pytest.raises(LedgerError, match="belongs to another user"):
        ledger.settle(row, 0.5, user="bob")
    with pytest.raises(LedgerError, match="more than the 1 reserved"):
        ledger.settle(row, 1.5, user="alice")
    with pytest.raises(LedgerError, match="unknown record field"):
        ledger.settle(row, 0.5, record={"secret": 1}, user="alice")
    zero = ledger.settle(row, 0.0, user="alice")
    assert (zero["epsilon_spent"], zero["delta_spent"]) == (0.0, 0.0)
    with pytest.raises(LedgerError, match="already settled"):
        ledger.settle(row, 0.5, user="alice")


def test_lost_run_counts_in_full(ledger):
    keep = ledger.reserve("cardio", "diabetes", 1.0, 1e-6, user="bob", pid=111, pid_start=5)
    dead = ledger.reserve("cardio", "diabetes", 2.0, 1e-6, user="bob", pid=222, pid_start=6)
    gone = ledger.mark_lost(lambda pid, start: pid == 111)
    assert gone == [dead]
    b = ledger.budget("cardio")[0]
    assert (b["epsilon_spent"], b["epsilon_reserved"], b["epsilon_left"]) == (2.0, 1.0, 2.0)
    with pytest.raises(LedgerError, match="already lost .*counts in full"):
        ledger.settle(dead, 0.1, user="bob")
    assert ledger.run(keep)["state"] == "reserved"


def test_steward_override_replaces_site_total(ledger, site):
    ledger.set_budget("cardio", "diabetes", 1.0, 1e-6, by="sam")
    b = ledger.budget("cardio")[0]
    assert (b["epsilon_total"], b["delta_total"], b["source"]) == (1.0, 1e-6, "steward")
    with pytest.raises(BudgetExceeded):
        ledger.reserve("cardio", "diabetes", 1.5, 1e-7, user="bob")
    # reopening keeps it; clearing returns to the site's total
    assert Ledger(site).total_for("cardio", "diabetes").epsilon == 1.0
    ledger.clear_budget("cardio", "diabetes")
    assert ledger.budget("cardio")[0]["epsilon_total"] == 5.0
    with pytest.raises(LedgerError, match="epsilon must be a positive number"):
        ledger.set_budget("cardio", "diabetes", -1, 1e-6, by="sam")


def test_concurrent_reservations_in_one_process_never_exceed_the_budget(ledger):
    """Eight threads race for gbsg2's epsilon 2.0 in steps of 0.07: exactly 28 fit, on either database."""
    got, refused = [], []

    def worker():
        for _ in range(6):
            try:
                got.append(ledger.reserve("oncology", "gbsg2", 0.07, 1e-9, user="alice"))
            except BudgetExceeded:
                refused.append(1)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 28 and len(refused) == 48 - 28
    assert {x["dataset"]: x for x in ledger.budget("oncology")}["gbsg2"]["epsilon_reserved"] == pytest.approx(28 * 0.07)


def test_stores_opened_at_once_on_an_empty_database_make_the_tables_once(site):
    """Four ledgers open the same new database together: one makes the tables, the others find them."""
    opened, failed = [], []

    def open_one():
        try:
            opened.append(Ledger(site))
        except Exception as e:  # noqa: BLE001 -- the assertion shows it
            failed.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failed and len(opened) == 4
    rid = opened[0].reserve("cardio", "diabetes", 1.0, 1e-6, user="bob")
    assert [r["id"] for r in opened[3].runs("cardio")] == [rid]
    for ledger in opened:
        ledger.close()


def _old_ledger_rows(execute) -> None:
    """What the ledger before migrations wrote: a settled run and a steward's total."""
    execute(
        "INSERT INTO runs (id, project, dataset, username, run_id, pid, pid_start, epsilon, delta, state, "
        "epsilon_spent, delta_spent, created, closed, record, weights_sha256) VALUES ('r-old', 'oncology', "
        "'gbsg2', 'alice', '', 1, NULL, 1.5, 1e-7, 'settled', 1.25, 1e-7, 1.0, 2.0, '{\"steps\": 3}', NULL)"
    )
    execute(
        "INSERT INTO budget_overrides (project, dataset, epsilon, delta, set_by, set_at) "
        "VALUES ('cardio', 'diabetes', 1.0, 1e-6, 'sam', 1.0)"
    )


def _check_kept_and_usable(ledger: Ledger) -> None:
    assert ledger.run("r-old")["epsilon_spent"] == 1.25 and ledger.run("r-old")["record"] == {"steps": 3}
    assert ledger.total_for("cardio", "diabetes").epsilon == 1.0
    with pytest.raises(BudgetExceeded, match="0.75 left of 2"):
        ledger.reserve("oncology", "gbsg2", 1.0, 1e-7, user="alice")
    ledger.reserve("oncology", "gbsg2", 0.5, 1e-7, user="alice")


def test_a_sqlite_ledger_from_before_migrations_is_stamped_not_made_anew(state_dir):
    site = make_site(state_dir)
    legacy_schemas.make_sqlite(db_path(site), legacy_schemas.LEDGER)
    with sqlite3.connect(db_path(site)) as db:
        _old_ledger_rows(db.execute)
    ledger = Ledger(site)
    _check_kept_and_usable(ledger)
    ledger.close()
    with sqlite3.connect(db_path(site)) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0003",)]
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone() == (2,)
    # and opened again, it is simply at the newest revision
    assert Ledger(site).run("r-old")["state"] == "settled"


def test_a_postgres_ledger_from_ledger_url_is_stamped_in_its_schema(state_dir, postgres_db):
    """A ledger made by the old code through [workspace] ledger_url (tables in the default schema)."""
    with psycopg.connect(postgres_db.url, passfile=postgres_db.passfile, autocommit=True) as conn:
        for statement in legacy_schemas.LEDGER:
            conn.execute(statement)
        _old_ledger_rows(conn.execute)
    site = make_site(state_dir)
    ledger = Ledger(site, url=f"{postgres_db.url}&passfile={postgres_db.passfile}")
    _check_kept_and_usable(ledger)
    ledger.close()
    with psycopg.connect(postgres_db.url, passfile=postgres_db.passfile) as conn:
        assert conn.execute("SELECT version_num FROM public.alembic_version").fetchall() == [("0003",)]


def test_a_ledger_left_in_public_is_not_begun_anew_in_its_schema(state_dir, postgres_db):
    """A site moving from ledger_url to [database] url: the ledger's tables must move, not be forgotten."""
    with psycopg.connect(postgres_db.url, passfile=postgres_db.passfile, autocommit=True) as conn:
        for statement in legacy_schemas.LEDGER:
            conn.execute(statement)
        _old_ledger_rows(conn.execute)
    site = make_site(state_dir, postgres_db.site_table())
    with pytest.raises(DatabaseError, match=r"ALTER TABLE public.budget_overrides SET SCHEMA \"ledger\";"):
        Ledger(site)
    with psycopg.connect(postgres_db.url, passfile=postgres_db.passfile, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA IF NOT EXISTS "ledger"')
        conn.execute('ALTER TABLE public.runs SET SCHEMA "ledger"')
        conn.execute('ALTER TABLE public.budget_overrides SET SCHEMA "ledger"')
    _check_kept_and_usable(Ledger(site))


def test_a_database_with_only_some_of_the_tables_is_refused(site):
    ledger = Ledger(site)
    with ledger.db.transaction() as conn:
        conn.exec_driver_sql("DROP TABLE budget_overrides")
        conn.exec_driver_sql("DROP TABLE alembic_version")
    ledger.close()
    with pytest.raises(DatabaseError, match="holds runs but not budget_overrides and no alembic_version"):
        Ledger(site)


def test_an_unreachable_server_says_what_to_check(state_dir):
    site = make_site(state_dir, {"url": f"postgresql://paitient@/ledger?host={state_dir}"})
    with pytest.raises(DatabaseError, match=r"cannot be reached: .*Check \[database\] url, that the server runs"):
        Ledger(site)


def test_a_password_file_others_can_read_is_refused(state_dir, postgres_db):
    site = make_site(state_dir, postgres_db.site_table())
    os.chmod(postgres_db.passfile, 0o644)
    try:
        with pytest.raises(Exception, match="readable by group or others"):
            Ledger(site)
    finally:
        os.chmod(postgres_db.passfile, 0o600)


def test_a_kernels_run_cannot_claim_a_training_jobs_weights(ledger):
    """A project member read a finished job's weights hash from the project's records and settled a run of
    her own (epsilon 0) with it; the airlock then found her run for the job's weights, and the job's
    certified release failed its ledger check. A kernel's run may no longer settle a job's weights hash,
    and the job's run is the one found for them."""
    job = ledger.reserve("oncology", "breast_cancer", 1.0, 1e-6, user="alice", run_id="job:job-eb9a8988d2a3")
    ledger.settle(job, 1.0, record={"weights_sha256": SHA, "steps": 40})
    mine = ledger.reserve("oncology", "breast_cancer", 0.001, 1e-9, user="carol", run_id="x")
    with pytest.raises(LedgerError, match="these weights are a training job's, settled by the runner") as e:
        ledger.settle(mine, 0.0, record={"weights_sha256": SHA}, user="carol")
    assert e.value.code == "bad_request"
    assert ledger.run(mine)["state"] == "reserved"  # nothing settled; her reservation stays hers to close
    assert ledger.record_by_hash(SHA)["run_id"] == "job:job-eb9a8988d2a3"
    # Other weights settle as ever.
    assert ledger.settle(mine, 0.0, record={"weights_sha256": "cd" * 32}, user="carol")["state"] == "settled"


def test_the_job_run_is_found_for_its_weights_even_beside_a_later_run_with_the_same_hash(ledger):
    """A self-settled run with the same hash, settled before the job's (or kept from before this rule), closed
    later than the job's: the job's run is still the one the airlock is given."""
    mine = ledger.reserve("oncology", "breast_cancer", 0.5, 1e-9, user="carol", run_id="x")
    job = ledger.reserve("oncology", "breast_cancer", 1.0, 1e-6, user="alice", run_id="job:job-1")
    ledger.settle(mine, 0.0, record={"weights_sha256": SHA}, user="carol")
    ledger.settle(job, 1.0, record={"weights_sha256": SHA})
    with ledger.db.transaction() as conn:
        conn.execute(sqlalchemy.text("UPDATE runs SET closed = closed + 3600 WHERE id = :id"), {"id": mine})
    assert ledger.record_by_hash(SHA)["id"] == job


def test_a_member_takes_at_most_her_share_and_the_others_keep_theirs(state_dir):
    """Attack (availability): one member reserves all that is left of a dataset's budget in a kernel she keeps
    alive, or spends it, and her colleagues' runs are refused. With member_share 0.5 her runs and reservations
    together stop at half; a colleague still gets the other half; the project's total still binds them all."""
    import tomllib

    from paitient.config import parse
    from tests.ledger.conftest import SITE_TOML

    text = SITE_TOML.format(state_dir=state_dir).replace(
        'name = "oncology"\n', 'name = "oncology"\nmember_share = 0.5\n', 1
    )
    ledger = Ledger(parse(tomllib.loads(text)))
    try:
        held = ledger.reserve("oncology", "breast_cancer", 3.0, 1e-7, user="alice")
        ledger.settle(ledger.reserve("oncology", "breast_cancer", 1.5, 1e-7, user="alice"), 1.0, user="alice")
        # 3 reserved (held, not spent) and 1 spent: 4 of her 5
        with pytest.raises(BudgetExceeded) as e:
            ledger.reserve("oncology", "breast_cancer", 1.5, 1e-7, user="alice")
        assert str(e.value) == (
            "privacy budget exceeded: epsilon 1.5 asked, but alice has used 4 (1 spent, 3 reserved) of the 5 one "
            "member of the project may use of oncology/breast_cancer's 10 (member_share 0.5), so that every member "
            "keeps a part of it. Ask for at most 1, or ask a data steward."
        )
        ledger.reserve("oncology", "breast_cancer", 1.0, 1e-7, user="alice")  # exactly her share
        rows = {r["dataset"]: r for r in ledger.budget("oncology", "alice")}
        assert rows["breast_cancer"]["member_share"] == 0.5
        assert rows["breast_cancer"]["epsilon_left_member"] == 0.0 and rows["breast_cancer"]["epsilon_left"] == 5.0
        assert rows["gbsg2"]["epsilon_left_member"] == 1.0  # half of its 2
        assert "epsilon_left_member" not in ledger.budget("oncology")[0]  # no member asked: no member's part
        ledger.reserve("oncology", "breast_cancer", 5.0, 1e-7, user="carol")  # the other half is carol's
        with pytest.raises(BudgetExceeded, match="has 0 left of 10"):  # the total still binds
            ledger.reserve("oncology", "breast_cancer", 0.5, 1e-7, user="dave")
        ledger.settle(held, 0.5, user="alice")  # what she did not spend comes back to her share
        ledger.reserve("oncology", "breast_cancer", 2.5, 1e-7, user="alice")
        # the other project has no share: one member may use all of it
        ledger.reserve("cardio", "diabetes", 5.0, 1e-7, user="bob")
    finally:
        ledger.close()


def test_a_member_takes_at_most_her_share_of_delta_too(state_dir):
    """Attack (availability): with member_share 0.5, a member reserves a tiny epsilon with almost all of a
    dataset's delta, and holds or spends it; every colleague's run was refused (no delta left), while the page
    still showed 9.99 epsilon left. The share now bounds her delta as it bounds her epsilon."""
    import tomllib

    from paitient.config import parse
    from tests.ledger.conftest import SITE_TOML

    text = SITE_TOML.format(state_dir=state_dir).replace(
        'name = "oncology"\n', 'name = "oncology"\nmember_share = 0.5\n', 1
    )
    ledger = Ledger(parse(tomllib.loads(text)))
    try:
        with pytest.raises(BudgetExceeded) as e:
            ledger.reserve("oncology", "breast_cancer", 0.01, 9.9e-6, user="alice")
        assert "delta 9.9e-06 asked, but alice has used 0" in str(e.value)
        assert "of the 5e-06 one member of the project may use of oncology/breast_cancer's delta 1e-05" in str(e.value)
        ledger.settle(ledger.reserve("oncology", "breast_cancer", 0.01, 5e-6, user="alice"), 0.01, user="alice")
        with pytest.raises(BudgetExceeded, match="delta 1e-07 asked"):
            ledger.reserve("oncology", "breast_cancer", 0.01, 1e-7, user="alice")
        ledger.reserve("oncology", "breast_cancer", 1.0, 4e-6, user="carol")  # the other half is carol's
    finally:
        ledger.close()


def test_a_member_holds_a_bounded_number_of_open_reservations(state_dir):
    """Attack (availability): one kernel reserving a tiny epsilon again and again, settling none. Before each
    reservation the ledger looks at every open one under its write lock: 200,000 of one account's made every
    other account's call take 5 s. A member now holds at most MAX_OPEN_PER_MEMBER open at once; settling one
    makes room, and a colleague is not bound by hers."""
    from paitient.services.ledger.store import MAX_OPEN_PER_MEMBER

    ledger = Ledger(make_site(state_dir))
    try:
        held = [
            ledger.reserve("oncology", "breast_cancer", 1e-6, 0.0, user="alice") for _ in range(MAX_OPEN_PER_MEMBER)
        ]
        with pytest.raises(LedgerError) as e:
            ledger.reserve("cardio", "diabetes", 1e-6, 0.0, user="alice")  # over all projects
        assert e.value.code == "too_many_reservations"
        assert f"you hold {MAX_OPEN_PER_MEMBER} reservations not yet settled" in str(e.value)
        ledger.reserve("oncology", "breast_cancer", 1e-6, 0.0, user="carol")
        ledger.settle(held[0], 0.0, user="alice")
        ledger.reserve("oncology", "breast_cancer", 1e-6, 0.0, user="alice")
    finally:
        ledger.close()


def test_a_run_cannot_settle_the_hash_of_another_members_weights(state_dir):
    """Attack: every member reads the project's records, weights hashes included. Alice settled a tiny run of
    another project with bob's weights' hash; the airlock, reading the latest run of a hash, took hers for
    the weights' training record, and bob's request failed its check ("belongs to project 'cardio'"). A run
    now settles only a hash no other member's run has."""
    ledger = Ledger(make_site(state_dir))
    try:
        bobs = ledger.reserve("oncology", "breast_cancer", 1.0, 1e-7, user="bob")
        ledger.settle(bobs, 0.8, record={"weights_sha256": "cd" * 32}, user="bob")
        alices = ledger.reserve("cardio", "diabetes", 0.01, 1e-7, user="alice")
        with pytest.raises(LedgerError, match="these weights are another member's") as e:
            ledger.settle(alices, 0.01, record={"weights_sha256": "cd" * 32}, user="alice")
        assert e.value.code == "bad_request" and ledger.run(alices)["state"] == "reserved"
        assert ledger.record_by_hash("cd" * 32)["id"] == bobs
        again = ledger.reserve("oncology", "breast_cancer", 0.5, 1e-7, user="bob")  # bob's own, again: fine
        ledger.settle(again, 0.5, record={"weights_sha256": "cd" * 32}, user="bob")
    finally:
        ledger.close()
