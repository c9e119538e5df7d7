"""Checks before a request: ``airlock.check`` and ``airlock.request``'s confirmation, against the real socket.

In this process the caller is root, registered as a researcher (as in test_kernel_side); the refusal of a
non-member comes from a real process of another account.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from paitient.kernel.airlock import AirlockCheckFailed, AirlockError, check, request
from paitient.services.airlock.service import Airlock, AirlockSettings
from paitient.services.kit.channel import ChannelServer
from tests.airlock.helpers import breast_cancer, csv_bytes, give, publish, register, run_as, wait_state
from tests.airlock.test_service import LINEAR, _weights, audit_records

SMALL = pd.DataFrame({"stage": ["I", "II", "III", "IV"], "patients": [120, 48, 3, 0]})
"""Stage III counts 3 people (below the minimum of 10) and stage IV none (a disclosive zero)."""
FINE = pd.DataFrame({"stage": ["I", "II", "III"], "patients": [120, 48, 31]})


@pytest.fixture
def root_user(registry, monkeypatch, site):
    register(registry, "rooty", 0, projects=["oncology", "cardio"])
    monkeypatch.setenv("PAITIENT_RUN_DIR", str(site.run_dir))


def nothing_kept(airlock: Airlock) -> None:
    """No request, no stored file, no count table for differencing."""
    assert airlock.store.list() == []
    assert [p for p in airlock.store.blobs.rglob("*") if p.is_file()] == []
    with airlock.store._connect() as db:
        assert db.execute(sa.text("SELECT COUNT(*) FROM count_tables")).scalar_one() == 0


def test_a_failing_table_names_its_cells_and_fixes_and_files_nothing(site, channel, airlock, root_user, tmp_path):
    path = tmp_path / "stages.csv"
    path.write_bytes(csv_bytes(SMALL))
    result = check(path, kind="table", project="oncology")
    assert result.would_fail and result.overall == "fail"
    assert {"minimum_count", "zeros"} <= set(result.failed)
    # The cells, by row and column of the table as the airlock reads it.
    assert result.cells == {(2, "patients"): ["minimum_count"], (3, "patients"): ["zeros"]}
    assert "suppress" in result.fix("minimum_count") and "merge the categories" in result.fix("minimum_count")
    assert "reach 10" in result.fix("minimum_count")
    assert "round or suppress" in result.fix("zeros")
    assert result.fix("labels") == ""  # every label is the project's: nothing to fix
    shown = result._repr_html_()
    assert "would FAIL" in shown and "no request filed" in shown
    assert 'title="minimum_count">3</td>' in shown and 'title="zeros">0</td>' in shown
    assert "<td>120</td>" not in shown  # only rows with a failed cell are shown
    assert "failed cells: row 2 'patients', row 3 'patients'" in repr(result)
    nothing_kept(airlock)
    (record,) = audit_records(site, "airlock.check_preview")
    assert record["actor"] == "rooty" and record["outcome"] == "ok"
    assert record["details"]["overall"] == "fail" and record["details"]["checks"]["minimum_count"] == "fail"
    assert record["details"]["project"] == "oncology" and record["details"]["kind"] == "table"
    assert len(record["details"]["sha256"]) == 64 and record["object"] == record["details"]["sha256"]
    assert "cells" not in json.dumps(record["details"])  # outcomes and hashes, no content


def test_a_passing_table_says_so(site, channel, airlock, root_user, tmp_path):
    path = tmp_path / "fine.csv"
    path.write_bytes(csv_bytes(FINE))
    result = check(path, kind="table", project="oncology")
    statuses = {c["check"]: c["status"] for c in result.checks}
    assert not result.would_fail and result.failed == [] and result.cells == {}
    assert statuses["minimum_count"] == statuses["zeros"] == statuses["labels"] == "pass"
    assert all(c["fix"] == "" for c in result.checks if c["status"] == "pass")
    assert "Rows of your table" not in result._repr_html_()
    nothing_kept(airlock)


def test_a_dataframe_is_checked_directly(channel, airlock, root_user):
    frame = SMALL.set_index("stage")  # a table as pd.crosstab or groupby makes it: the index is a column
    result = check(frame, project="oncology", name="by_stage.csv")
    assert result.answer["filename"] == "by_stage.csv"
    assert result.cells == {(2, "patients"): ["minimum_count"], (3, "patients"): ["zeros"]}
    assert "<td>III</td>" in result._repr_html_()  # the row's label, from the kernel's own table
    free_text = pd.DataFrame({"stage": ["I", "born 1961-02-03"], "patients": [120, 48]})
    labels = check(free_text, project="oncology")
    assert labels.failed == ["labels"] and labels.cells == {(1, "stage"): ["labels"]}
    assert "catalogued categories" in labels.fix("labels")
    nothing_kept(airlock)


def test_a_non_member_is_refused(site, channel, airlock, make_system_user, registry):
    bob = make_system_user("bob")
    register(registry, "bob", bob.pw_uid, projects=["cardio"])
    path = give(Path(bob.pw_dir) / "t.csv", csv_bytes(FINE), bob.pw_uid)
    code = f"""
        import json
        from paitient import airlock
        for project in ("oncology", "cardio"):
            try:
                print(json.dumps({{"overall": airlock.check({str(path)!r}, project=project).overall}}))
            except airlock.AirlockError as e:
                print(json.dumps({{"error": str(e), "code": e.code}}))
    """
    proc = run_as(bob.pw_uid, code, site.run_dir, cwd=path.parent)
    assert proc.returncode == 0, proc.stderr
    refused, allowed = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    assert refused["code"] == "forbidden" and "not a member of project 'oncology'" in refused["error"]
    assert allowed == {"overall": allowed["overall"]} and allowed["overall"] in ("pass", "review")
    denied = [r for r in audit_records(site, "airlock.check_preview") if r["outcome"] == "denied"]
    assert len(denied) == 1 and denied[0]["actor"] == "bob" and denied[0]["details"]["project"] == "oncology"
    # An account the hub never registered gets nothing either.
    stranger = run_as(
        65534,
        """
        import pandas as pd
        from paitient import airlock
        try:
            airlock.check(pd.DataFrame({"stage": ["I"], "patients": [120]}))
        except airlock.AirlockError as e:
            print(e.code, e)
        """,
        site.run_dir,
    )
    assert stranger.stdout.startswith("forbidden") and "is not a paitient account" in stranger.stdout
    nothing_kept(airlock)


def test_request_of_a_failing_table_files_only_when_confirmed(channel, airlock, root_user, tmp_path):
    path = tmp_path / "stages.csv"
    path.write_bytes(csv_bytes(SMALL))
    for confirm in (None, False):  # not asked here (no notebook to answer): nothing waits, nothing is filed
        with pytest.raises(AirlockCheckFailed, match=r"not filed: .* would fail \(.*minimum_count") as e:
            request(path, kind="table", justification="Table 1", project="oncology", confirm=confirm)
        assert "confirm=True" in str(e.value) and e.value.code == "check_failed"
        assert e.value.result.cells[(2, "patients")] == ["minimum_count"]
    nothing_kept(airlock)
    rid = request(path, kind="table", justification="Table 1", project="oncology", confirm=True)
    wait_state(airlock, rid, "in_review")
    (req,) = airlock.store.list()
    assert req.id == rid and req.justification == "Table 1"
    # A table that passes is filed without being asked.
    fine = tmp_path / "fine.csv"
    fine.write_bytes(csv_bytes(FINE))
    assert request(fine, kind="table", justification="Table 2", project="oncology") != rid
    with pytest.raises(AirlockError, match="confirm= is True"):
        request(fine, kind="table", justification="Table 2", project="oncology", confirm="yes")  # type: ignore[call-overload]


def test_weights_are_checked_without_the_audit_and_say_so(site, channel, airlock, root_user, tmp_path):
    publish(site, "oncology", "breast_cancer", breast_cancer())
    data, _ = _weights()
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    result = check(
        path,
        kind="weights",
        project="oncology",
        model_source=LINEAR,
        target="target",
        split={"holdout": 0.3, "seed": 0},
        dataset="breast_cancer",
    )
    audit = next(c for c in result.checks if c["check"] == "membership_inference")
    assert audit["status"] == "review" and "not run in a check before the request" in audit["reason"]
    assert result.skipped == ["membership_inference"] and "not run before a request" in repr(result)
    assert {c["check"]: c["status"] for c in result.checks}["format"] == "pass"
    nothing_kept(airlock)


def bounded(site, **settings) -> tuple[Airlock, ChannelServer]:
    airlock = Airlock(site, settings=AirlockSettings(**settings))
    srv = ChannelServer(site.run_dir / "airlock.sock", airlock.handlers(), name="airlock")
    srv.start_in_thread()
    return airlock, srv


def test_a_check_is_bounded_in_size_and_time(site, root_user, tmp_path):
    small = tmp_path / "stages.csv"
    small.write_bytes(csv_bytes(SMALL))
    # Large enough that its checks take many thread switch intervals: a zero time limit cuts them.
    large = tmp_path / "large.csv"
    large.write_bytes(csv_bytes(pd.DataFrame({"stage": ["I", "II"] * 2500, "patients": range(10, 5010)})))
    for path, settings, code, words in (
        (small, {"check_max_bytes": 16}, "too_large", "file the request instead"),
        (large, {"check_timeout": 0.0}, "timeout", "took longer than"),
    ):
        airlock, srv = bounded(site, **settings)
        try:
            with pytest.raises(AirlockError, match=words) as e:
                check(path, project="oncology")
            assert e.value.code == code
            while airlock.feedback.running():  # a check that overran finishes on its own
                time.sleep(0.01)
            rid = request(path, kind="table", justification="Table 1", project="oncology")
            assert airlock.store.get(rid).state == "submitted"
        finally:
            srv.shutdown()
            srv.server_close()
    records = audit_records(site, "airlock.check_preview")
    assert [r["outcome"] for r in records].count("denied") == 2
    assert {r["details"]["bound"] for r in records if r["outcome"] == "error"} == {"timeout"}


def test_a_failing_table_too_large_to_check_is_filed_unasked(site, root_user, tmp_path):
    """The check is advice: when it cannot run, request() files the output and its own checks run after it."""
    path = tmp_path / "stages.csv"
    path.write_bytes(csv_bytes(SMALL))
    airlock, srv = bounded(site, check_max_bytes=16)
    airlock.start()
    try:
        rid = request(path, kind="table", justification="Table 1", project="oncology")
        wait_state(airlock, rid, "in_review")
        assert {c["check"]: c["status"] for c in airlock.store.checks(rid)}["minimum_count"] == "fail"
    finally:
        srv.shutdown()
        srv.server_close()
        airlock.stop()


def test_the_form_files_no_failing_table_and_shows_why(channel, airlock, root_user, tmp_path, capsys):
    from paitient.kernel.airlock import form

    path = tmp_path / "stages.csv"
    path.write_bytes(csv_bytes(SMALL))
    file_, _kind, project, why, _weights_box, button, _out = form().children
    file_.value, project.value, why.value = str(path), "oncology", "cohort table"
    button.click()
    out = capsys.readouterr().out
    assert "Not submitted: not filed:" in out and "minimum_count" in out and "confirm=True" in out
    nothing_kept(airlock)
