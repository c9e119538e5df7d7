"""``paitient jobs verify``: check a signed training record, and the weights it names, offline.

``paitient jobs checkpoints add|list|remove``: the operator's registry of pretrained checkpoints (as root)."""

from __future__ import annotations

import getpass
import math
from pathlib import Path
from typing import Any

from traitlets import Unicode

from paitient.app import CommandGroup, PaitientCommand
from paitient.rules.training_record import RecordInvalid, key_id, parse_envelope, verify
from paitient.services.jobs import checkpoints
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
            return parse_envelope(data)
        except RecordInvalid as e:
            print(f"paitient {self.name}: NOT VERIFIED: {path}: {e}")
            self.exit(1)


class CheckpointsAdd(PaitientCommand):
    name = "jobs checkpoints add"
    description = (
        "Add a pretrained checkpoint (a safetensors file of float32, float16 or bfloat16 tensors) to the registry "
        "that certified jobs may start from (as root). The file is checked (no pickle, finite values, bounded "
        "size) and kept read-only by its SHA-256; researchers see its name, description, source and parameters."
    )
    examples = (
        "paitient jobs checkpoints add model.safetensors --name=resnet-tab --description='MLP pretrained on ...' "
        "--source='https://example.org/model, CC-BY-4.0'"
    )
    checkpoint_name = Unicode("", help="The name researchers give as jobs.submit(..., checkpoint=NAME).").tag(
        config=True
    )
    description_text = Unicode("", help="What the model is and what it was trained on.").tag(config=True)
    source = Unicode("", help="Where the file comes from and its licence.").tag(config=True)
    added_by = Unicode("", help="Who adds it (recorded in the registry; default: the login name).").tag(config=True)
    aliases = {
        **PaitientCommand.aliases,
        "name": "CheckpointsAdd.checkpoint_name",
        "description": "CheckpointsAdd.description_text",
        "source": "CheckpointsAdd.source",
        "added-by": "CheckpointsAdd.added_by",
    }

    def start(self) -> None:
        self.require_root()
        if len(self.extra_args) != 1:
            self.fail("name one file: paitient jobs checkpoints add FILE --name=NAME --description=... --source=...")
        if not self.checkpoint_name:
            self.fail("give the checkpoint a --name=NAME (researchers pass it as jobs.submit(..., checkpoint=NAME))")
        path = Path(self.extra_args[0])
        try:
            size = path.stat().st_size
            if size > checkpoints.MAX_BYTES:
                self.fail(f"{path}: {checkpoints.too_large(size)}")
            data = path.read_bytes()
        except OSError as e:
            self.fail(f"cannot read {path}: {e.strerror}")
        site = self.load_site()
        by = self.added_by or getpass.getuser()
        try:
            entry = checkpoints.CheckpointRegistry(site.state_dir).add(
                data, name=self.checkpoint_name, description=self.description_text, source=self.source, added_by=by
            )
        except checkpoints.CheckpointRefused as e:
            self.fail(f"{path} not added: {e}")
        _audit(self, site, by, "jobs.checkpoint.add", entry)
        print(f"added {entry.name}: {entry.sha256}, {len(entry.parameters)} tensors, {entry.size} bytes")
        self.exit(0)


class CheckpointsList(PaitientCommand):
    name = "jobs checkpoints list"
    description = "List the pretrained checkpoints of the registry: name, SHA-256, parameters, source (as root)."
    examples = "paitient jobs checkpoints list"

    def start(self) -> None:
        self.require_root()
        site = self.load_site()
        try:
            entries = checkpoints.CheckpointRegistry(site.state_dir).list()
        except checkpoints.CheckpointRefused as e:
            self.fail(str(e))
        if not entries:
            print("no checkpoints (add one: paitient jobs checkpoints add FILE --name=NAME ...)")
        for c in entries:
            values = sum(math.prod(shape) for shape in c.parameters.values())
            print(f"{c.name}  {c.sha256}  {len(c.parameters)} tensors, {values} values")
            print(f"  added {c.added_at} by {c.added_by}: {c.description}")
            print(f"  source: {c.source}")
        self.exit(0)


class CheckpointsRemove(PaitientCommand):
    name = "jobs checkpoints remove"
    description = (
        "Remove a checkpoint from the registry (as root). Jobs that name it and have not started fail; records "
        "of jobs that started from it name its SHA-256 and still verify."
    )
    examples = "paitient jobs checkpoints remove resnet-tab"
    removed_by = Unicode("", help="Who removes it (for the audit record; default: the login name).").tag(config=True)
    aliases = {**PaitientCommand.aliases, "removed-by": "CheckpointsRemove.removed_by"}

    def start(self) -> None:
        self.require_root()
        if len(self.extra_args) != 1:
            self.fail("name one checkpoint: paitient jobs checkpoints remove NAME (paitient jobs checkpoints list)")
        site = self.load_site()
        by = self.removed_by or getpass.getuser()
        try:
            gone = checkpoints.CheckpointRegistry(site.state_dir).remove(self.extra_args[0])
        except checkpoints.CheckpointRefused as e:
            self.fail(str(e))
        _audit(self, site, by, "jobs.checkpoint.remove", gone)
        print(f"removed {gone.name} ({gone.sha256})")
        self.exit(0)


def _audit(command: PaitientCommand, site: Any, actor: str, action: str, entry: checkpoints.Checkpoint) -> None:
    try:
        from paitient.services.audit import emit

        emit(site, actor=actor, action=action, object=entry.name, details={"sha256": entry.sha256, "size": entry.size})
    except Exception as e:
        command.log.error("could not write the audit record: %s", e)


class CheckpointsCommand(CommandGroup):
    name = "jobs checkpoints"
    description = "The registry of pretrained checkpoints jobs may start from: add, list, remove (as root)."
    commands = {"add": CheckpointsAdd, "list": CheckpointsList, "remove": CheckpointsRemove}


class JobsCommand(CommandGroup):
    name = "jobs"
    description = "Certified training jobs: check a signed training record and its weights; manage checkpoints."
    commands = {"verify": JobsVerify, "checkpoints": CheckpointsCommand}
