"""`paitient backup` and `paitient restore`: a snapshot of a working state, restored into a fresh state
directory, resumes work; a backup whose audit trail was edited is refused before anything is written."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest

from paitient.config import parse
from paitient.ops.backup import MANIFEST, BackupError, backup, restore, sha256_file, verify_backup
from paitient.rules.pseudonyms import pseudonym_strings
from paitient.services import audit
from paitient.services.airlock.store import Store
from paitient.services.audit.verify import verify_dir
from paitient.services.data import keys as data_keys
from paitient.services.data import rowindex
from paitient.services.egress.store import EgressStore
from paitient.services.jobs import keys as job_keys
from paitient.services.jobs.store import JobStore
from paitient.services.ledger.store import Ledger

PY = sys.executable

SITE_TOML = """
[workspace]
state_dir = "{state_dir}"

[[projects]]
name = "oncology"
group = "oncology"
datasets = ["breast_cancer", "gbsg2"]
stewards = ["sam"]
budget = {{ epsilon = 10.0, delta = 1e-5 }}
"""


def make_site(state_dir: Path, site_file: Path):
    text = SITE_TOML.format(state_dir=state_dir)
    site_file.write_text(text)
    return parse(tomllib.loads(text), source=str(site_file))


@pytest.fixture
def world(world_tmp):
    """A state directory with ledger runs, an airlock request, audit records, keys, a released job output
    and published data: what a workspace holds after some work."""
    state = world_tmp / "state"
    state.mkdir(mode=0o755)
    site = make_site(state, world_tmp / "site.toml")
    ledger = Ledger(site)
    first = ledger.reserve("oncology", "breast_cancer", 1.0, 1e-6, user="alice")
    ledger.settle(first, 0.7, {"epochs": 3}, user="alice")
    ledger.reserve("oncology", "gbsg2", 0.5, 1e-7, user="carol")  # still reserved at the backup
    ledger.set_budget("oncology", "gbsg2", 4.0, 1e-6, by="sam")

    store = Store.for_site(site)
    blob = b"age_band,count\n40-49,17\n50-59,23\n"
    digest, size = store.put_blob(blob)
    request = store.create(
        project="oncology",
        username="alice",
        account="alice",
        uid=20001,
        kind="table",
        filename="counts.csv",
        sha256=digest,
        size=size,
        justification="Table 2",
        meta={"rows": 2},
    )
    store.transition(request.id, "checking", actor="airlock")

    for n in range(5):
        audit.emit(site, actor="alice", action="cell.execute", object=f"kernel-{n}", details={"code": f"x = {n}"})
    audit.emit(site, actor="alice", action="airlock.request", object=request.id, details={"project": "oncology"})

    data_keys.ensure_key(site)
    job_keys.ensure_signing_key(site)
    rowindex.ensure_key(site)
    jobs = JobStore(state)
    out = jobs.out_dir("job-1")
    out.mkdir(mode=0o700)
    (out / "record.json").write_text(json.dumps({"job": "job-1"}))
    (out / "model.safetensors").write_bytes(os.urandom(4096))
    jobs.close()
    version = site.data_root / "oncology" / "breast_cancer" / "versions" / "1"
    version.mkdir(parents=True)
    (version / "data.parquet").write_bytes(b"PAR1" + os.urandom(1000))
    os.chmod(version / "data.parquet", 0o444)
    return site, request


def fresh_site(world_tmp: Path, name: str = "restored"):
    return make_site(world_tmp / name, world_tmp / f"{name}.toml")


def test_a_restored_state_resumes_work(world, world_tmp):
    site, request = world
    # the workspace keeps writing while the backup is taken: the copy still ends at a record boundary
    stop = threading.Event()

    def keep_writing():
        n = 0
        while not stop.is_set():
            audit.emit(site, actor="system", action="audit.start", object=f"busy-{n}")
            n += 1

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        manifest = backup(site, world_tmp / "backup")
    finally:
        stop.set()
        writer.join()

    target = world_tmp / "backup"
    assert stat.S_IMODE(target.stat().st_mode) == 0o700 and target.stat().st_uid == 0
    assert not [p for p in world_tmp.iterdir() if ".partial-" in p.name]
    recorded = json.loads((target / MANIFEST).read_text())
    for rel, meta in recorded["files"].items():
        assert sha256_file(target / rel) == meta["sha256"], rel
    assert "state/ledger/ledger.sqlite3" in recorded["files"] and "key/pseudonym.key" in recorded["files"]
    assert f"state/airlock/blobs/{request.sha256[:2]}/{request.sha256}" in recorded["files"]
    assert recorded["files"]["key/pseudonym.key"]["mode"] == 0o600

    restored = fresh_site(world_tmp)
    restore(restored, target)

    # ledger: the same budget, the same runs
    before, after = Ledger(site), Ledger(restored)
    assert after.budget("oncology") == before.budget("oncology")
    assert after.runs() == before.runs()
    assert after.total_for("oncology", "gbsg2").epsilon == 4.0

    # airlock: the request reads back, its blob has the hash the request records
    again = Store.for_site(restored).get(request.id)
    assert again.sha256 == request.sha256 and again.state == "checking"
    assert sha256_file(Store.for_site(restored).blob_path(again.sha256)) == request.sha256

    # audit: the copy verifies, ends at the head the manifest recorded, and new records chain onto it
    report = verify_dir(restored.state_dir / "audit")
    assert report.ok, report.problems
    assert (report.last_seq, report.last_hash) == (manifest.audit_head["seq"], manifest.audit_head["hash"])
    record = audit.emit(restored, actor="sam", action="airlock.decision", object=request.id)
    assert record["prev"] == report.last_hash and record["seq"] == report.last_seq + 1
    assert verify_dir(restored.state_dir / "audit").ok

    # keys: the same pseudonyms, the same signing key, the same row-detection key; root 0600 as before
    ids = ["P001", "P002", "P003"]
    old = pseudonym_strings(ids, data_keys.project_key(data_keys.load_master_key(site), "oncology"))
    new = pseudonym_strings(ids, data_keys.project_key(data_keys.load_master_key(restored), "oncology"))
    assert old.to_pylist() == new.to_pylist()
    assert job_keys.public_key_path(restored).read_text() == job_keys.public_key_path(site).read_text()
    assert job_keys.load_signing_key(restored).public_key() == job_keys.load_signing_key(site).public_key()
    assert rowindex.load_key(restored) == rowindex.load_key(site)
    for key in (restored.key_file, job_keys.private_key_path(restored), rowindex.key_path(restored)):
        st = key.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0), key
    assert stat.S_IMODE((restored.state_dir / "keys").stat().st_mode) == 0o700
    assert stat.S_IMODE(restored.state_dir.stat().st_mode) == 0o755

    # released job output and published data, with their modes
    assert (restored.state_dir / "jobs/out/job-1/model.safetensors").read_bytes() == (
        site.state_dir / "jobs/out/job-1/model.safetensors"
    ).read_bytes()
    published = restored.data_root / "oncology/breast_cancer/versions/1/data.parquet"
    assert stat.S_IMODE(published.stat().st_mode) == 0o444
    # the reserved run of the original keeps its state, and the restored ledger takes new work
    rid = after.reserve("oncology", "breast_cancer", 0.5, 1e-7, user="alice")
    assert after.run(rid)["state"] == "reserved"


def edit_a_record(backup_dir: Path, seq: int) -> str:
    """Change one detail of the record ``seq`` in the backup's trail, leaving the JSON valid; returns the file."""
    trail = backup_dir / "state" / "audit"
    for path in sorted(trail.glob("trail-*.jsonl")):
        lines = path.read_bytes().splitlines(keepends=True)
        for i, line in enumerate(lines):
            rec = json.loads(line)
            if rec["seq"] == seq:
                rec["object"] = "kernel-999"
                lines[i] = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode() + b"\n"
                os.chmod(path, 0o600)
                path.write_bytes(b"".join(lines))
                return path.name
    raise AssertionError(f"no record {seq}")


def test_a_backup_whose_audit_chain_was_edited_is_refused_naming_the_record(world, world_tmp):
    site, _request = world
    backup(site, world_tmp / "backup")
    name = edit_a_record(world_tmp / "backup", seq=3)
    restored = fresh_site(world_tmp)
    with pytest.raises(BackupError) as refused:
        restore(restored, world_tmp / "backup")
    message = str(refused.value)
    assert f"state/audit/{name}" in message and "(seq 3)" in message, message
    assert "nothing was restored" in message
    assert not restored.state_dir.exists()
    assert not [p for p in world_tmp.iterdir() if ".restore-" in p.name]


def test_an_edited_record_with_a_recomputed_manifest_is_still_refused(world, world_tmp):
    # whoever edits a record can also fix its file's hash in the manifest: the chain itself still names it
    site, _request = world
    backup(site, world_tmp / "backup")
    name = edit_a_record(world_tmp / "backup", seq=2)
    manifest = json.loads((world_tmp / "backup" / MANIFEST).read_text())
    manifest["files"][f"state/audit/{name}"]["sha256"] = sha256_file(world_tmp / "backup/state/audit" / name)
    (world_tmp / "backup" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BackupError, match=r"\(seq 2\)"):
        verify_backup(world_tmp / "backup")


def test_a_changed_or_removed_file_is_refused_before_anything_is_written(world, world_tmp):
    site, request = world
    backup(site, world_tmp / "backup")
    blob = world_tmp / "backup" / "state/airlock/blobs" / request.sha256[:2] / request.sha256
    os.chmod(blob, 0o600)
    blob.write_bytes(b"age_band,count\n40-49,1\n")
    restored = fresh_site(world_tmp)
    with pytest.raises(BackupError, match=f"state/airlock/blobs/{request.sha256[:2]}/{request.sha256} in the backup"):
        restore(restored, world_tmp / "backup")
    blob.unlink()
    with pytest.raises(BackupError, match="lacks 1 file"):
        restore(restored, world_tmp / "backup")
    assert not restored.state_dir.exists()


def test_records_cut_from_the_end_of_the_backup_are_refused(world, world_tmp):
    site, _request = world
    backup(site, world_tmp / "backup")
    trail = sorted((world_tmp / "backup/state/audit").glob("trail-*.jsonl"))[-1]
    os.chmod(trail, 0o600)
    trail.write_bytes(b"".join(trail.read_bytes().splitlines(keepends=True)[:-1]))
    with pytest.raises(BackupError, match="records were removed from the end"):
        verify_backup(world_tmp / "backup")


def test_backup_and_restore_refuse_places_that_are_not_fresh(world, world_tmp):
    site, _request = world
    taken = world_tmp / "taken"
    taken.mkdir()
    (taken / "something").write_text("x")
    with pytest.raises(BackupError, match="not an empty folder"):
        backup(site, taken)
    backup(site, world_tmp / "backup")
    with pytest.raises(BackupError, match="pass --force"):
        restore(site, world_tmp / "backup")


def test_force_moves_the_existing_state_aside(world, world_tmp):
    site, request = world
    backup(site, world_tmp / "backup")
    audit.emit(site, actor="alice", action="cell.execute", object="after-the-backup")
    Store.for_site(site).transition(request.id, "in_review", actor="airlock")
    warnings: list[str] = []
    restore(site, world_tmp / "backup", force=True, warn=warnings.append)
    aside = [p for p in world_tmp.iterdir() if p.name.startswith("state.before-restore-")]
    assert len(aside) == 1 and warnings and str(aside[0]) in warnings[0]
    assert Store.for_site(site).get(request.id).state == "checking"
    assert verify_dir(site.state_dir / "audit").ok
    assert (aside[0] / "audit").is_dir()  # the replaced state is kept, not deleted


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "paitient.cli", *args], capture_output=True, text=True, timeout=120, **kw)


def test_the_commands_back_up_restore_and_refuse_an_edited_trail(world, world_tmp):
    site, _request = world
    made = run_cli("backup", str(world_tmp / "backup"), f"--site={site.source}")
    assert made.returncode == 0, made.stderr
    head = json.loads((world_tmp / "backup" / MANIFEST).read_text())["audit_head"]
    assert f"ends at seq {head['seq']} hash {head['hash']}" in made.stdout, made.stdout
    again = run_cli("backup", str(world_tmp / "backup"), f"--site={site.source}")
    assert again.returncode == 2 and "exists and is not an empty folder" in again.stderr

    restored = world_tmp / "restored"
    ok = run_cli("restore", str(world_tmp / "backup"), f"--site={site.source}", f"--state-dir={restored}")
    assert ok.returncode == 0, ok.stderr
    assert "audit trail verified" in ok.stdout
    check = run_cli("audit", "verify", f"--state-dir={restored}")
    assert check.returncode == 0, check.stdout + check.stderr

    name = edit_a_record(world_tmp / "backup", seq=4)
    refused = run_cli("restore", str(world_tmp / "backup"), f"--state-dir={world_tmp / 'other'}")
    assert refused.returncode == 2
    assert f"state/audit/{name}" in refused.stderr and "(seq 4)" in refused.stderr, refused.stderr
    assert not (world_tmp / "other").exists()


def test_the_commands_need_root(world, world_tmp):
    site, _request = world
    nobody = run_cli(
        "backup",
        str(world_tmp / "backup"),
        f"--site={site.source}",
        preexec_fn=lambda: (os.setgroups([]), os.setgid(65534), os.setuid(65534)),
    )
    assert nobody.returncode == 2 and "must run as root" in nobody.stderr, nobody.stderr
    assert not (world_tmp / "backup").exists()


def test_stores_in_postgres_are_left_to_pg_dump_and_said_so(world_tmp, postgres_db):
    """With [database] url the stores' records are in PostgreSQL: the backup holds no SQLite file of them
    (one left from before the move is not the current state) and its notes say to run pg_dump. The jobs'
    released files and the row-detection indexes stay files and are in it."""
    state = world_tmp / "state"
    state.mkdir(mode=0o755)
    site = parse(
        {"workspace": {"state_dir": str(state)}, "database": postgres_db.site_table()},
        source=str(world_tmp / "site.toml"),
    )
    Ledger(site).close()  # the ledger's tables made in PostgreSQL
    (state / "ledger").mkdir(mode=0o700)
    (state / "ledger" / "ledger.sqlite3").write_bytes(b"")  # left from before the move
    jobs = JobStore.for_site(site)  # the queue's table made in PostgreSQL
    jobs.submit(username="alice", project="oncology", dataset="bc", spec={}, graph_sha256="f" * 64)
    jobs.out_dir("job-1").mkdir(mode=0o700)
    (jobs.out_dir("job-1") / "record.json").write_text("{}")
    jobs.close()
    (state / "jobs" / "jobs.sqlite3").write_bytes(b"")  # left from before the move
    egress = EgressStore.for_site(site)  # the counts' tables made in PostgreSQL
    egress.add("alice", "2026-12-04", size=10, rows={"oncology/bc": [1]})
    egress.close()
    index = rowindex.index_root(site) / "oncology" / "bc" / "1"
    index.mkdir(mode=0o700, parents=True)
    (index / "header.json").write_text("{}")  # the row-detection indexes beside the counts are files
    (state / "egress" / "egress.sqlite3").write_bytes(b"")  # left from before the move
    manifest = backup(site, world_tmp / "backup")
    assert not [name for name in manifest.files if name.startswith(("state/ledger/", "state/airlock/", "state/hub/"))]
    assert "state/jobs/jobs.sqlite3" not in manifest.files
    assert "state/jobs/out/job-1/record.json" in manifest.files
    note = next(n for n in manifest.notes if "PostgreSQL ([database] url): back that database up with pg_dump" in n)
    assert "the jobs queue's and the egress counts' records" in note
    assert "state/egress/egress.sqlite3" not in manifest.files
    assert "state/egress/index/oncology/bc/1/header.json" in manifest.files
