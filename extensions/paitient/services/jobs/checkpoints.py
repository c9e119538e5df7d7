"""The registry of pretrained checkpoints: public models an operator adds, that a job may start from.

``<state_dir>/jobs/checkpoints/`` (root 0700, inside the runner's own 0700 folder): each checkpoint is
``<sha256>.safetensors`` (root 0444, written once and never changed) and ``index.json`` (root 0444) names
them: name, description, the source and licence the operator gave, each parameter's name and shape, who
added it and when. A file is published whole (a temporary file in the same folder, fsync'd, linked into
place) before the index names it; the index is replaced atomically under a lock. Kernels never see the
folder: they list it through the runner's socket, and a job names a checkpoint, never sends values.

A checkpoint is a safetensors file and nothing else: no pickle is ever read. It is parsed here, not
trusted to a library: the header's size, JSON and fields, every tensor's dtype (float32, float16 or
bfloat16; made float32 on load), shape and byte range (contiguous, no gap, no overlap, covering the data
exactly), the number of values (at most the runner's parameter bound) and every value finite. When a job
starts from one, the runner reads the file again and refuses it when its SHA-256 is no longer the one it
was added with (:meth:`CheckpointRegistry.load`).
"""

from __future__ import annotations

import hashlib
import json
import keyword
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from paitient.config import NAME_RE
from paitient.fsutil import atomic_write_bytes, create_once, locked
from paitient.services.kit.secretfile import private_dirs

FORMAT = "paitient.checkpoints/1"
MAX_VALUES = 50_000_000
"""As many values as a graph may have parameters (:data:`paitient.services.jobs.graph.MAX_PARAMETERS`)."""
MAX_HEADER_BYTES = 1_000_000
MAX_BYTES = 8 + MAX_HEADER_BYTES + 4 * MAX_VALUES
MAX_TENSORS = 10_000
MAX_TEXT = 2000
DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2)}
_PARAMETER_NAME = re.compile(r"(?!__)\w{1,64}(\.(?!__)\w{1,64}){0,15}", re.ASCII)
_SHA256 = re.compile(r"[0-9a-f]{64}")
TO_SAFETENSORS = (
    "convert it where you trust its origin: safetensors.torch.save_file(model.state_dict(), 'model.safetensors')"
)


class CheckpointRefused(ValueError):
    """A checkpoint that cannot be added or used; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class Checkpoint:
    name: str
    sha256: str
    description: str
    source: str
    parameters: dict[str, tuple[int, ...]]
    size: int
    added_by: str
    added_at: str

    def public(self) -> dict[str, Any]:
        """What a researcher sees of it (the values stay with the runner)."""
        return {
            "name": self.name,
            "sha256": self.sha256,
            "description": self.description,
            "source": self.source,
            "parameters": {k: list(v) for k, v in self.parameters.items()},
            "size": self.size,
            "added_by": self.added_by,
            "added_at": self.added_at,
        }


def parse(data: bytes, *, max_values: int = MAX_VALUES) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as float32 arrays, every rule above checked; raises
    :class:`CheckpointRefused` naming the first one broken."""
    size = int.from_bytes(data[:8], "little") if len(data) >= 10 else -1
    if not 0 < size <= MAX_HEADER_BYTES or 8 + size > len(data) or data[8:9] != b"{":
        if (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or data[:4] == b"PK\x03\x04":
            raise CheckpointRefused(
                "this is a pickle (a torch.save, .pt, .pth or .bin file); the registry takes safetensors only and "
                f"never unpickles: {TO_SAFETENSORS}"
            )
        raise CheckpointRefused(
            "this is not a safetensors file (its first 8 bytes are not the length of a JSON header that follows): "
            + TO_SAFETENSORS
        )
    try:
        header = json.loads(data[8 : 8 + size])
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CheckpointRefused(f"the safetensors header is not JSON: the file is damaged; {TO_SAFETENSORS}") from None
    if not isinstance(header, dict):
        raise CheckpointRefused("the safetensors header is not a JSON object: the file is damaged")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointRefused("the safetensors __metadata__ must map names to strings")
    if not header:
        raise CheckpointRefused("the file holds no tensor")
    if len(header) > MAX_TENSORS:
        raise CheckpointRefused(f"the file holds {len(header)} tensors, more than {MAX_TENSORS}")
    body = memoryview(data)[8 + size :]
    spans: list[tuple[int, int, str]] = []
    total = 0
    layout: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, entry in header.items():
        _check_name(name)
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointRefused(f"tensor {name!r}: a header entry has exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise CheckpointRefused(
                f"tensor {name!r} is {str(dtype)[:20]}; parameters are float32, float16 or bfloat16 (F32, F16, BF16)"
            )
        if not isinstance(shape, list) or len(shape) > 8 or not all(_whole(d) and d >= 0 for d in shape):
            raise CheckpointRefused(f"tensor {name!r}: its shape must be a list of at most 8 sizes")
        count = math.prod(shape)
        total += count
        if total > max_values:
            raise CheckpointRefused(
                f"the file holds more than {max_values} values (tensor {name!r} passes it); the runner trains "
                "models of at most that many parameters"
            )
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_whole(o) for o in offsets)):
            raise CheckpointRefused(f"tensor {name!r}: data_offsets must be [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end or end - begin != count * DTYPES[dtype][1]:
            raise CheckpointRefused(
                f"tensor {name!r}: its bytes ({begin} to {end}) do not hold a {dtype} tensor of shape {shape}"
            )
        spans.append((begin, end, name))
        layout[name] = (dtype, tuple(shape), begin, end)
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise CheckpointRefused(f"tensor {name!r}: the tensors' bytes overlap or leave a gap: the file is damaged")
        at = end
    if at != len(body):
        raise CheckpointRefused(
            f"the tensors take {at} bytes and the file holds {len(body)} after its header: the file is damaged"
        )
    out: dict[str, np.ndarray] = {}
    for name, (dtype, shape, begin, end) in layout.items():
        raw = np.frombuffer(body[begin:end], dtype=DTYPES[dtype][0])
        values = (raw.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else raw.astype(np.float32)
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise CheckpointRefused(
                f"tensor {name!r} holds {bad} NaN or infinite value(s); a checkpoint's values are all finite"
            )
        out[name] = values.reshape(shape)
    return out


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_name(name: str) -> None:
    if not _PARAMETER_NAME.fullmatch(name) or any(keyword.iskeyword(p) for p in name.split(".")):
        raise CheckpointRefused(
            f"tensor name {name[:80]!r} is not a parameter name (dotted words, no '__', no Python keyword), "
            "as a model's state_dict names them"
        )


def match(parameters: Mapping[str, tuple[int, ...]], graph_params: Mapping[str, tuple[tuple[int, ...], Any]]) -> None:
    """Raise :class:`CheckpointRefused` unless the checkpoint has exactly the graph's parameter names and
    shapes, saying which differ."""
    want = {k: tuple(shape) for k, (shape, _) in graph_params.items()}
    got = {k: tuple(v) for k, v in parameters.items()}
    if got == want:
        return
    problems = []
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    if missing:
        problems.append(f"the model has {', '.join(missing[:8])} and the checkpoint does not")
    if extra:
        problems.append(f"the checkpoint has {', '.join(extra[:8])} and the model does not")
    shapes = [k for k in want if k in got and want[k] != got[k]]
    problems.extend(f"{k} is {list(want[k])} in the model, {list(got[k])} in the checkpoint" for k in shapes[:8])
    raise CheckpointRefused(
        "the checkpoint does not fit the model: "
        + "; ".join(problems)
        + ". Build the model with the same layers (and layer names) as the checkpoint's parameters "
        "(paitient.jobs.checkpoints() lists them)"
    )


class CheckpointRegistry:
    """The checkpoint folder and its index; all changes as root, under one lock."""

    def __init__(self, state_dir: str | Path):
        self.state_dir = Path(state_dir)
        self.root = self.state_dir / "jobs" / "checkpoints"

    @property
    def index_path(self) -> Path:
        return self.root / "index.json"

    def path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.safetensors"

    def _ensure(self) -> None:
        private_dirs(self.state_dir, self.root)

    def _read_index(self) -> dict[str, dict[str, Any]]:
        try:
            doc = json.loads(self.index_path.read_text())
        except FileNotFoundError:
            return {}
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("checkpoints"), dict):
            raise CheckpointRefused(f"{self.index_path} is not a checkpoint index ({FORMAT}); restore it from a backup")
        return doc["checkpoints"]

    def _write_index(self, entries: dict[str, dict[str, Any]]) -> None:
        text = json.dumps({"format": FORMAT, "checkpoints": entries}, indent=2, sort_keys=True) + "\n"
        atomic_write_bytes(self.index_path, text.encode(), mode=0o444)

    def list(self) -> list[Checkpoint]:
        return [_entry(name, e) for name, e in sorted(self._read_index().items())]

    def get(self, name: str) -> Checkpoint:
        entries = self._read_index()
        if name not in entries:
            known = ", ".join(sorted(entries)) or "none"
            raise CheckpointRefused(
                f"there is no checkpoint {name[:40]!r} in the registry (it holds: {known}); "
                "paitient.jobs.checkpoints() lists them, and an operator adds one with paitient jobs checkpoints add"
            )
        return _entry(name, entries[name])

    def add(self, data: bytes, *, name: str, description: str, source: str, added_by: str) -> Checkpoint:
        """Check ``data`` and publish it under ``name``: the file first, then the index that names it."""
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise CheckpointRefused(f"name {name!r:.40}: use 1 to 32 of a-z, 0-9, _ and -, starting with a letter")
        for what, text in (("description", description), ("source", source)):
            if not text.strip() or len(text) > MAX_TEXT or any(ord(c) < 32 and c not in "\n\t" for c in text):
                raise CheckpointRefused(
                    f"give a --{what} of 1 to {MAX_TEXT} printable characters"
                    + (" (where the model comes from and its licence)" if what == "source" else "")
                )
        if len(data) > MAX_BYTES:
            raise CheckpointRefused(too_large(len(data)))
        tensors = parse(data)
        sha256 = hashlib.sha256(data).hexdigest()
        self._ensure()
        with locked(self.root / ".lock"):
            entries = self._read_index()
            if name in entries:
                raise CheckpointRefused(
                    f"a checkpoint is already named {name!r}; remove it first (paitient jobs checkpoints remove "
                    f"{name}) or choose another name"
                )
            same = [n for n, e in entries.items() if e.get("sha256") == sha256]
            if same:
                raise CheckpointRefused(f"this file is already in the registry as {same[0]!r}")
            path = self.path(sha256)
            if path.exists():  # left by an add that stopped before the index named it
                path.chmod(0o600)
                path.unlink()
            create_once(path, data, mode=0o444)
            os.chown(path, 0, 0)
            entries[name] = {
                "sha256": sha256,
                "description": description,
                "source": source,
                "parameters": {k: list(v.shape) for k, v in tensors.items()},
                "size": len(data),
                "added_by": added_by,
                "added_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
            self._write_index(entries)
        return _entry(name, entries[name])

    def remove(self, name: str) -> Checkpoint:
        """Take ``name`` out of the index, then its file. Records that name its SHA-256 still verify."""
        self._ensure()
        with locked(self.root / ".lock"):
            entries = self._read_index()
            gone = self.get(name)
            del entries[name]
            self._write_index(entries)
            path = self.path(gone.sha256)
            if path.exists():
                path.unlink()
        return gone

    def load(self, name: str, sha256: str | None = None) -> tuple[Checkpoint, dict[str, np.ndarray]]:
        """The checkpoint ``name`` (which must still be the file of ``sha256``, given one) and its values, read
        again from the registry: refused when the file is not the one the operator added."""
        entry = self.get(name)
        if sha256 is not None and entry.sha256 != sha256:
            raise CheckpointRefused(
                f"checkpoint {name!r} was replaced in the registry after the job was submitted; submit the job again"
            )
        path = self.path(entry.sha256)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise CheckpointRefused(
                f"checkpoint {name!r} has no file in the registry; the operator should remove it and add it again"
            ) from None
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o222:
                raise CheckpointRefused(
                    f"checkpoint {name!r}: {path} is not a read-only file of root's; the operator should remove it "
                    "and add it again"
                )
            if info.st_size > MAX_BYTES:
                raise CheckpointRefused(too_large(info.st_size))
            data = f.read()
        got = hashlib.sha256(data).hexdigest()
        if got != entry.sha256:
            raise CheckpointRefused(
                f"checkpoint {name!r} changed on disk after it was added (its SHA-256 is now {got}, not "
                f"{entry.sha256}); it is not used. The operator should remove it and add the published file again"
            )
        return entry, parse(data)


def too_large(size: int) -> str:
    return (
        f"the file has {size} bytes, more than {MAX_BYTES} (a model of {MAX_VALUES} float32 parameters); "
        "the runner trains no model that large"
    )


def _entry(name: str, e: Mapping[str, Any]) -> Checkpoint:
    sha256 = e.get("sha256")
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise CheckpointRefused(f"the registry's entry {name!r} has no SHA-256; remove it and add the file again")
    return Checkpoint(
        name=name,
        sha256=sha256,
        description=str(e.get("description", "")),
        source=str(e.get("source", "")),
        parameters={str(k): tuple(int(d) for d in v) for k, v in dict(e.get("parameters", {})).items()},
        size=int(e.get("size", 0)),
        added_by=str(e.get("added_by", "")),
        added_at=str(e.get("added_at", "")),
    )
