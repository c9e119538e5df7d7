"""Every kind of tampering is found, and verify names the first bad record (file, line, seq, what)."""

import json
import subprocess
import sys

from paitient.rules.records import encode, make_record
from paitient.services.audit.verify import check_trail, verify_dir
from paitient.services.audit.writer import AuditLog, trail_files


def lines_of(path):
    return path.read_bytes().splitlines(keepends=True)


def write_lines(path, lines):
    path.write_bytes(b"".join(lines))


def only_file(log):
    ((_, path),) = trail_files(log.directory)
    return path


def test_untouched_trail_verifies(trail, fill):
    fill(trail, 20)
    report = verify_dir(trail.directory)
    assert report.ok, report.problems
    assert report.records == 21 and report.files == 1 and report.last_seq == 20 and not report.notes


def test_edited_record_is_named(trail, fill):
    fill(trail, 10)
    path = only_file(trail)
    lines = lines_of(path)
    lines[5] = lines[5].replace(b'"actor":"alice"', b'"actor":"mallory"')
    write_lines(path, lines)
    first = verify_dir(trail.directory).first_problem
    assert (first.file, first.line, first.seq) == ("trail-000001.jsonl", 6, 5)
    assert "does not match its hash: the record was altered" in first.message


def test_edit_with_recomputed_hash_breaks_the_next_link(trail, fill):
    fill(trail, 10)
    path = only_file(trail)
    lines = lines_of(path)
    rec = json.loads(lines[5])
    rec["details"]["code"] = "innocent()"
    forged = make_record(
        **{k: rec[k] for k in ("seq", "prev", "actor", "action", "object", "outcome", "details", "time")}
    )
    lines[5] = encode(forged)
    write_lines(path, lines)
    first = verify_dir(trail.directory).first_problem
    assert (first.line, first.seq) == (7, 6)
    assert "prev does not match the hash of seq 5" in first.message


def test_deleted_record_is_named(trail, fill):
    fill(trail, 10)
    path = only_file(trail)
    lines = lines_of(path)
    del lines[4]  # seq 4
    write_lines(path, lines)
    first = verify_dir(trail.directory).first_problem
    assert (first.line, first.seq) == (5, 5)
    assert "seq 4..4 are missing (deleted)" in first.message


def test_inserted_record_is_named(trail, fill):
    fill(trail, 10)
    path = only_file(trail)
    lines = lines_of(path)
    before = json.loads(lines[3])
    # A well-formed record that claims to follow seq 3: its own hash is valid, the next link breaks.
    inserted = make_record(seq=4, prev=before["hash"], actor="bob", action="airlock.decision", object="r1")
    lines.insert(4, encode(inserted))
    write_lines(path, lines)
    report = verify_dir(trail.directory)
    first = report.first_problem
    assert (first.line, first.seq) == (6, 4)
    assert "seq 4 follows seq 4: records were reordered or inserted" in first.message


def test_reordered_records_are_named(trail, fill):
    fill(trail, 10)
    path = only_file(trail)
    lines = lines_of(path)
    lines[3], lines[4] = lines[4], lines[3]
    write_lines(path, lines)
    report = verify_dir(trail.directory)
    first, second = report.problems[:2]
    assert (first.line, first.seq) == (4, 4) and "record(s) seq 3..3 are missing" in first.message
    assert (second.line, second.seq) == (5, 3)
    assert "seq 3 follows seq 4: records were reordered or inserted" in second.message


def test_torn_last_line_is_reported(trail, fill):
    fill(trail, 5)
    path = only_file(trail)
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    report = verify_dir(trail.directory)
    first = report.first_problem
    assert (first.line, first.seq) == (6, None)
    assert first.message.startswith("torn last line")


def test_cut_tail_of_whole_records_is_caught_by_head(trail, fill):
    fill(trail, 5)
    path = only_file(trail)
    write_lines(path, lines_of(path)[:-2])
    report = verify_dir(trail.directory)
    assert not report.ok
    assert "head.json says seq 5 was written, the trail ends at seq 3" in report.first_problem.message


def test_replaced_last_record_is_caught_by_head(trail, fill):
    fill(trail, 5)
    path = only_file(trail)
    lines = lines_of(path)
    last = json.loads(lines[-1])
    last["object"] = "other"
    lines[-1] = encode(
        make_record(**{k: last[k] for k in ("seq", "prev", "actor", "action", "object", "outcome", "details", "time")})
    )
    write_lines(path, lines)
    first = verify_dir(trail.directory).first_problem
    assert first.seq == 5 and "differs from the record head.json says was written last" in first.message


def test_rotation_keeps_the_chain_across_files(tmp_path, fill):
    log = AuditLog(tmp_path / "audit", rotate_bytes=4096)
    recs = fill(log, 120)
    files = trail_files(log.directory)
    assert len(files) >= 4
    report = verify_dir(log.directory)
    assert report.ok, report.problems
    assert report.files == len(files) and report.last_seq == recs[-1]["seq"]
    # each file after the first opens with a header whose prev is the previous file's last hash
    for (_, before), (_, after) in zip(files, files[1:], strict=False):
        last = json.loads(lines_of(before)[-1])
        header = json.loads(lines_of(after)[0])
        assert header["action"] == "audit.file" and header["prev"] == last["hash"]
        assert header["details"] == {"file": after.name, "previous_file": before.name}


def test_removed_middle_file_is_named(tmp_path, fill):
    log = AuditLog(tmp_path / "audit", rotate_bytes=4096)
    fill(log, 120)
    files = trail_files(log.directory)
    files[1][1].unlink()
    first = verify_dir(log.directory).first_problem
    assert first.file == files[2][1].name and first.line == 0
    assert "trail-000002.jsonl is missing" in first.message


def test_pure_check_needs_no_files():
    a = make_record(
        seq=0,
        prev="0" * 64,
        actor="system",
        action="audit.file",
        details={"file": "trail-000001.jsonl", "previous_file": ""},
    )
    b = make_record(seq=1, prev=a["hash"], actor="alice", action="auth.login")
    assert check_trail([("trail-000001.jsonl", [encode(a), encode(b)])]).ok
    bad = check_trail([("trail-000001.jsonl", [encode(b)])])
    assert "does not begin with its audit.file header" in bad.first_problem.message


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "paitient.cli", "audit", *args], capture_output=True, text=True)


def test_cli_verify_exit_codes_and_message(trail, fill):
    fill(trail, 3)
    ok = run_cli("verify", f"--trail={trail.directory}")
    assert ok.returncode == 0 and "audit trail intact: 4 records" in ok.stdout
    path = only_file(trail)
    lines = lines_of(path)
    lines[2] = lines[2].replace(b"x = 1", b"x = 9")
    write_lines(path, lines)
    bad = run_cli("verify", f"--trail={trail.directory}")
    assert bad.returncode == 1
    assert "audit trail BROKEN at trail-000001.jsonl line 3 (seq 2): content does not match its hash" in bad.stderr
    js = run_cli("verify", "--json", f"--trail={trail.directory}")
    assert js.returncode == 1 and json.loads(js.stdout)["problems"][0]["seq"] == 2
