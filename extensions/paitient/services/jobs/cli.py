"""``paitient jobs verify``: check a signed training record, and the weights it names, offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from traitlets import Unicode

from paitient.app import CommandGroup, PaitientCommand
from paitient.rules.training_record import RecordInvalid, key_id, verify
from paitient.services.jobs.keys import load_public_key, public_key_path

MAX_RECORD_BYTES = 1_000_000


class JobsVerify(PaitientCommand):
    name = "jobs verify"
    description = (
        "Check a signed training record against the workspace's public key, and the weights file against the "
        "record: a released pair (--record, --weights) or a job of this workspace by its id (as root). Prints "
        "the record's facts and exits 0 when both hold; says which check failed and exits 1 otherwise."
    )
    examples = (
        "paitient jobs verify job-3f2a9c0d1e2b\n"
        "paitient jobs verify --record=record.json --weights=model.safetensors\n"
        "paitient jobs verify --record=record.json --weights=model.safetensors --public-key=jobs-signing.pub"
    )
    record = Unicode("", help="The signed record (JSON), as released with the weights.").tag(config=True)
    weights = Unicode("", help="The weights file (safetensors) the record names. Empty: check the record alone.").tag(
        config=True
    )
    public_key = Unicode(
        "",
        help="The workspace's published public key. Empty: <state_dir>/public/jobs-signing.pub of the site.",
    ).tag(config=True)
    aliases = {
        **PaitientCommand.aliases,
        **{k.replace("_", "-"): f"JobsVerify.{k}" for k in ("record", "weights", "public_key")},
    }

    def start(self) -> None:
        job_id = self.extra_args[0] if self.extra_args else ""
        if not self.record and not job_id:
            self.fail("name what to check: a job id, or --record=FILE (and --weights=FILE for its weights)")
        site = self.load_site() if job_id or not self.public_key else None
        key_file = Path(self.public_key) if self.public_key or site is None else public_key_path(site)
        try:
            public = load_public_key(key_file)
        except FileNotFoundError:
            self.fail(f"no public key at {key_file}; pass --public-key=FILE, as published with the workspace")
        except RecordInvalid as e:
            self.fail(f"public key {key_file}: {e}")
        weights: bytes | None
        if job_id:
            envelope, weights = self._job(site, job_id)
        else:
            envelope = self._read_record(Path(self.record))
            weights = self._read(Path(self.weights), "weights file") if self.weights else None
        try:
            record = verify(envelope, public, weights)
        except RecordInvalid as e:
            print(f"paitient {self.name}: NOT VERIFIED: {e}")
            self.exit(1)
        what = "record and weights" if weights is not None else "record (weights not checked: pass --weights)"
        print(f"verified: {what} signed by key {key_id(public)}")
        for name in ("job_id", "project", "dataset", "dataset_version", "n_train", "epsilon", "delta", "accountant"):
            print(f"  {name}: {record[name]}")
        print(f"  weights_sha256: {record['weights_sha256']}")
        self.exit(0)

    def _job(self, site: Any, job_id: str) -> tuple[object, bytes]:
        self.require_root()
        folder = site.state_dir / "jobs" / "out" / job_id
        if not (folder / "record.json").is_file():
            self.fail(f"job {job_id!r} has no published record in {folder.parent}; is it done? (paitient jobs)")
        return self._read_record(folder / "record.json"), self._read(folder / "model.safetensors", "weights file")

    def _read(self, path: Path, what: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as e:
            self.fail(f"cannot read the {what} {path}: {e.strerror}")

    def _read_record(self, path: Path) -> object:
        data = self._read(path, "record")
        if len(data) > MAX_RECORD_BYTES:
            self.fail(f"{path} has {len(data)} bytes; a training record has at most {MAX_RECORD_BYTES}")
        try:
            return json.loads(data)
        except ValueError as e:
            print(f"paitient {self.name}: NOT VERIFIED: {path} is not JSON ({e})")
            self.exit(1)


class JobsCommand(CommandGroup):
    name = "jobs"
    description = "Certified training jobs: check a signed training record and its weights."
    commands = {"verify": JobsVerify}
