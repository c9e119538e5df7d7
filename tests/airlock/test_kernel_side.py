"""The kernel-side API and form against the real socket, the CLI, and "no audit record, no download"."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from paitient.config.reference import effective_toml
from paitient.kernel.airlock import AirlockError, form, request, status
from paitient.kernel.airlock.source import class_source
from paitient.services.airlock.service import Airlock, AirlockSettings
from paitient.services.audit import AuditError
from tests.airlock.helpers import GOOD, register, submit, wait_state


@pytest.fixture
def root_user(registry, monkeypatch, site):
    """In this process the caller is root: register uid 0 as a researcher, as the hub would a user."""
    register(registry, "rooty", 0, projects=["oncology", "cardio"])
    monkeypatch.setenv("PAITIENT_RUN_DIR", str(site.run_dir))


def test_request_and_status_from_the_kernel_api(channel, airlock, root_user, tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(GOOD)
    with pytest.raises(AirlockError, match="name the project: project= one of oncology, cardio"):
        request(path, kind="table", justification="x")
    rid = request(path, kind="table", justification="x", project="cardio")
    wait_state(airlock, rid, "in_review")
    mine = status()
    assert [r["id"] for r in mine] == [rid] and mine[0]["project"] == "cardio"
    assert "<td>in_review</td>" in mine._repr_html_()
    by_check = {c["check"]: c for c in status(rid)["checks"]}
    assert by_check["minimum_count"] == {
        "check": "minimum_count",
        "status": "pass",
        "reason": "every count is at least 10 (or zero)",
        "details": {"threshold": 10},
    }
    with pytest.raises(AirlockError, match="cannot open"):
        request(tmp_path / "absent.csv", kind="table", justification="x", project="cardio")


def test_outside_a_kernel_the_api_says_so(monkeypatch, tmp_path):
    monkeypatch.delenv("PAITIENT_RUN_DIR", raising=False)
    with pytest.raises(AirlockError, match="PAITIENT_RUN_DIR is not set"):
        status()


def test_form_submits_through_the_service(channel, airlock, root_user, tmp_path, capsys):
    path = tmp_path / "t.csv"
    path.write_bytes(GOOD)
    box = form()
    file_, kind, project, why, weights_box, button, _out = box.children
    assert weights_box.layout.display == "none"
    kind.value = "weights"
    assert weights_box.layout.display == ""
    kind.value = "table"
    file_.value, project.value = str(path), "oncology"
    button.click()
    assert "Not submitted:" in capsys.readouterr().out  # no justification yet: the service says what is missing
    why.value = "cohort table for the paper"
    button.click()
    out = capsys.readouterr().out
    assert "Submitted: request " in out
    (req,) = airlock.store.list()
    assert req.justification == "cohort table for the paper" and req.project == "oncology"


class Net:  # a model class defined in a file: its module's source travels
    pass


def test_model_source_from_a_class():
    assert "class Net:" in class_source(Net) and "def test_model_source_from_a_class" in class_source(Net)


def test_no_audit_record_no_download(site, people):
    def failing_trail(**record):
        # the request and the decision need their records too (tests/airlock/test_fail_closed.py): this trail
        # fills up just before the download
        if record["action"] == "airlock.download":
            raise AuditError("the audit trail cannot be written: disk full")

    airlock = Airlock(site, settings=AirlockSettings(), emit=failing_trail)
    airlock.start()
    try:
        rid = submit(airlock, people, "alice", GOOD)
        wait_state(airlock, rid, "in_review")
        airlock.decide(rid, username="sam", scopes={"custom:airlock:review"}, action="approve", comment="ok")
        with pytest.raises(AuditError, match="disk full"):
            airlock.download(rid, username="alice", scopes={"custom:airlock:download"})
    finally:
        airlock.stop()


def test_cli_lists_and_shows_requests(site, airlock, people, world_tmp):
    rid = submit(airlock, people, "alice", GOOD, name="cohort.csv")
    wait_state(airlock, rid, "in_review")
    site_file = world_tmp / "site.toml"
    site_file.write_text(effective_toml(site))  # where the store is: SQLite under the state dir or PostgreSQL
    base = [sys.executable, "-m", "paitient.cli", "airlock", f"--site={site_file}", f"--state-dir={site.state_dir}"]
    out = subprocess.run(base, capture_output=True, text=True, check=True).stdout
    assert rid in out and "cohort.csv" in out and "in_review" in out
    shown = json.loads(subprocess.run([*base, rid], capture_output=True, text=True, check=True).stdout)
    assert [e["type"] for e in shown["events"]][:2] == ["state", "state"]
    assert shown["events"][-1] == {**shown["events"][-1], "type": "state", "to": "in_review"}
    listed = json.loads(
        subprocess.run([*base, "--json", "--state=released"], capture_output=True, text=True, check=True).stdout
    )
    assert listed == []


def test_error_text_from_model_code_reaches_stewards_only(airlock, people):
    rid = submit(airlock, people, "alice", GOOD)
    wait_state(airlock, rid, "in_review")
    airlock.store.record_checks(
        rid,
        [
            {
                "check": "membership_inference",
                "status": "error",
                "reason": "the audit could not run the model",
                "details": {"error": "ValueError: age=87 sex=F", "auc": 0.5},
            }
        ],
    )
    req = airlock.store.get(rid)
    mine = {c["check"]: c for c in airlock.describe(req, for_steward=False)["checks"]}
    assert mine["membership_inference"]["details"] == {"auc": 0.5}
    theirs = {c["check"]: c for c in airlock.describe(req, for_steward=True)["checks"]}
    assert theirs["membership_inference"]["details"]["error"] == "ValueError: age=87 sex=F"


def test_resubmission_links_only_to_ones_own_request(channel, airlock, root_user, tmp_path, people):
    other = submit(airlock, people, "alice", GOOD)
    path = tmp_path / "t.csv"
    path.write_bytes(GOOD)
    with pytest.raises(AirlockError, match="is not one of your requests"):
        request(path, kind="table", justification="x", project="cardio", supersedes=other)
    first = request(path, kind="table", justification="x", project="cardio")
    second = request(path, kind="table", justification="rounded", project="cardio", supersedes=first)
    assert airlock.store.get(second).meta["supersedes"] == first


def test_only_readable_regular_files_are_taken(channel, airlock, root_user, tmp_path):
    from paitient.channel import ChannelError, call

    r, w = os.pipe()
    opath = os.open(tmp_path, os.O_PATH)
    wronly = os.open(tmp_path / "w.csv", os.O_WRONLY | os.O_CREAT)
    try:
        for fd in (r, opath, wronly):
            with pytest.raises(ChannelError, match="send a regular file opened for reading") as e:
                call(channel.path, "request", {"kind": "table", "justification": "x", "project": "cardio"}, fds=[fd])
            assert e.value.code == "bad_request"
        with pytest.raises(ChannelError, match="exactly one open file descriptor"):
            call(channel.path, "request", {"kind": "table", "justification": "x", "project": "cardio"})
    finally:
        for fd in (r, w, opath, wronly):
            os.close(fd)
    assert airlock.store.list() == []


def test_model_source_from_a_notebook_cell():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        shell.run_cell(
            "import torch\nclass Tiny(torch.nn.Module):\n    def __init__(self, d):\n"
            "        super().__init__()\n        self.lin = torch.nn.Linear(d, 2)\n",
            store_history=True,
        )
        shell.run_cell("x = 1", store_history=True)
        source = class_source(shell.user_ns["Tiny"])
    finally:
        InteractiveShell.clear_instance()
    ns: dict = {}
    exec(source, ns)  # noqa: S102 - the source the airlock would run in its sandbox
    assert ns["Tiny"](3).lin.in_features == 3


def test_many_kernels_submitting_at_once(channel, airlock, root_user, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    paths = []
    for i in range(16):
        p = tmp_path / f"t{i}.csv"
        p.write_bytes(f"stage,n\nI,{100 + i}\nII,{50 + i}\n".encode())
        paths.append(p)
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda p: request(p, kind="table", justification=p.name, project="cardio"), paths))
    airlock.wait_idle()
    assert len(set(ids)) == 16
    stored = {r.id: r for r in airlock.store.list()}
    assert set(stored) == set(ids) and {r.state for r in stored.values()} == {"in_review"}
    # each request holds its own file
    for rid, p in zip(ids, paths, strict=True):
        assert airlock.store.read_blob(stored[rid].sha256) == p.read_bytes() and stored[rid].justification == p.name
