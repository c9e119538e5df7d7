"""The writer: many processes keep one chain; a crash mid-append is found, quarantined and noted."""

import json
import multiprocessing
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from paitient.rules.records import AuditError
from paitient.services.audit.verify import verify_dir
from paitient.services.audit.writer import AuditLog, trail_files


def _writer(directory: str, who: str, n: int, rotate: int) -> None:
    log = AuditLog(directory, rotate_bytes=rotate)
    for i in range(n):
        log.append(actor=who, action="cell.execute", object=f"{who}-{i}", details={"i": i})


def test_eight_concurrent_writer_processes_keep_one_chain(tmp_path):
    directory = str(tmp_path / "audit")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(directory, f"w{k}", 40, 16384)) for k in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    report = verify_dir(directory)
    assert report.ok, report.problems
    files = trail_files(tmp_path / "audit")
    records = [json.loads(line) for _, path in files for line in path.read_bytes().splitlines()]
    events = [r for r in records if r["action"] == "cell.execute"]
    assert len(events) == 320
    assert [r["seq"] for r in records] == list(range(len(records)))
    for k in range(8):  # each writer's own records are all there, in its own order
        mine = [r["details"]["i"] for r in events if r["actor"] == f"w{k}"]
        assert mine == list(range(40))
    assert report.files > 1  # rotation happened while 8 processes were writing


def test_trail_is_root_only(trail):
    trail.append(actor="alice", action="auth.login")
    mode = stat.S_IMODE(os.stat(trail.directory).st_mode)
    assert mode == 0o750
    for name in os.listdir(trail.directory):
        st = os.stat(trail.directory / name)
        if stat.S_ISREG(st.st_mode):
            assert st.st_uid == 0 and not st.st_mode & 0o027, name


CRASH = textwrap.dedent("""
    import os, signal, sys
    from paitient.services.audit.writer import AuditLog

    class CrashingLog(AuditLog):
        # A real process killed by SIGKILL in the middle of writing its line.
        def _write_out(self, fd, data):
            os.write(fd, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)

    CrashingLog(sys.argv[1]).append(actor="alice", action="cell.execute", object="k", details={"code": "2+2"})
""")


def test_crash_mid_append_is_reported_then_recovered(trail, fill):
    fill(trail, 3)
    ((_, path),) = trail_files(trail.directory)
    good = path.read_bytes()
    crash = subprocess.run([sys.executable, "-c", CRASH, str(trail.directory)])
    assert crash.returncode == -9
    torn = path.read_bytes()[len(good) :]
    assert torn and not torn.endswith(b"\n")

    report = verify_dir(trail.directory)
    assert not report.ok
    first = report.first_problem
    assert (first.file, first.line) == (path.name, 5) and first.message.startswith("torn last line")

    # The next writer does not chain onto the torn bytes: it quarantines them and says so.
    rec = trail.append(actor="bob", action="auth.login")
    lines = path.read_bytes().splitlines()
    recovered = json.loads(lines[5])
    assert recovered["action"] == "audit.recovered" and recovered["outcome"] == "error"
    assert recovered["seq"] == 4 and recovered["prev"] == json.loads(lines[3])["hash"]
    details = recovered["details"]
    assert details["reason"] == "torn" and details["offset"] == len(good) and details["length"] == len(torn)
    assert (trail.directory / details["quarantine"]).read_bytes() == torn  # evidence kept
    assert lines[4] == torn  # and left in place: the trail is append-only
    assert rec["seq"] == 5 and rec["prev"] == recovered["hash"]

    after = verify_dir(trail.directory)
    assert after.ok, after.problems
    assert len(after.notes) == 1 and "torn write of" in after.notes[0].message
    assert after.notes[0].line == 5


def test_whole_record_missing_only_its_newline_is_kept(trail, fill):
    fill(trail, 2)
    ((_, path),) = trail_files(trail.directory)
    path.write_bytes(path.read_bytes()[:-1])  # crash between the record and its newline
    rec = trail.append(actor="bob", action="auth.login")
    assert rec["seq"] == 3
    report = verify_dir(trail.directory)
    assert report.ok and not report.notes and report.records == 4


def test_corrupt_last_record_is_not_chained_onto_and_stays_visible(trail, fill):
    fill(trail, 3)
    ((_, path),) = trail_files(trail.directory)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[-1] = lines[-1].replace(b"x = 2", b"x = 7")
    path.write_bytes(b"".join(lines))
    rec = trail.append(actor="bob", action="auth.login")
    recovered = json.loads(path.read_bytes().splitlines()[-2])
    assert recovered["action"] == "audit.recovered" and recovered["details"]["reason"] == "corrupt"
    assert recovered["prev"] == json.loads(lines[-2])["hash"] and rec["prev"] == recovered["hash"]
    report = verify_dir(trail.directory)  # tampering is not healed by the recovery
    assert not report.ok and report.first_problem.seq == 3
    assert "does not match its hash" in report.first_problem.message


def test_batch_append_is_one_chain(trail):
    recs = trail.append_many([{"actor": "a", "action": "ledger.settle", "details": {"i": i}} for i in range(50)])
    assert [r["seq"] for r in recs] == list(range(1, 51))
    assert verify_dir(trail.directory).ok


def test_writer_refuses_a_directory_users_could_write(tmp_path):
    directory = tmp_path / "audit"
    directory.mkdir(mode=0o777)
    os.chmod(directory, 0o777)
    with pytest.raises(AuditError, match=r"group or others may write to it \(mode 777\); run: chmod 750"):
        AuditLog(directory).append(actor="a", action="auth.login")
    os.chmod(directory, 0o750)
    os.chown(directory, 65534, 65534)
    with pytest.raises(AuditError, match="it is owned by uid 65534, not by the writer"):
        AuditLog(directory).append(actor="a", action="auth.login")
    assert trail_files(directory) == []
