"""Checks for model weights: the file format, and the privacy record the weights must match.

Only safetensors leave the workspace. Pickle-based formats (``torch.save``'s ``.pt``/``.pth``, plain
pickle) run code when they are loaded, so they are refused by their content, whatever the file is called.
A safetensors file starts with an 8-byte little-endian header length followed by that many bytes of JSON
describing each tensor (dtype, shape, byte offsets); :func:`parse_safetensors` validates all of it without
loading any tensor.

The parameters are identified by the project's canonical parameter hash (:func:`canonical_sha256`, as
``paitient.kernel.dp`` records it: the tensors re-serialised without metadata), so the same parameters match
whatever metadata the file carries; the SHA-256 of the file bytes is tried as well. Either must match a
training record in the privacy ledger, and that record's epsilon and delta must lie within the
project's budget.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

from paitient.rules.disclosure import result

MAX_HEADER = 100 << 20
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


class WeightsFormatError(ValueError):
    """The file is not safetensors; the message says how to save weights so the airlock takes them."""


def sniff_code_format(data: bytes) -> str | None:
    """Name the code-executing format ``data`` is in (pickle, torch zip), or ``None``."""
    if data[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save's format, which holds a pickle)"
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return f"a pickle (protocol {data[1]})"
    if data[:1] in (b"(", b"]", b"}", b"c") and data.rstrip()[-1:] == b".":
        return "a pickle (protocol 0/1)"
    return None


_SAVE_HINT = (
    "save the state dict with safetensors.torch.save_file(model.state_dict(), 'model.safetensors'); "
    "pickle-based files run code when they are loaded, so the airlock never takes them"
)


def parse_safetensors(data: bytes) -> dict[str, dict[str, Any]]:
    """Validate a safetensors file and return its tensor table ``{name: {dtype, shape, data_offsets}}``.

    The structure is validated first (a valid safetensors file is safe to load whatever its first bytes
    happen to look like); only a file that is not valid safetensors is named as pickle or zip if it is one.
    """
    try:
        return _parse(data)
    except WeightsFormatError:
        code = sniff_code_format(data)
        if code:
            raise WeightsFormatError(f"the file is {code}, refused: {_SAVE_HINT}") from None
        raise


def _parse(data: bytes) -> dict[str, dict[str, Any]]:
    if len(data) < 8:
        raise WeightsFormatError(f"the file is too short for safetensors; {_SAVE_HINT}")
    (n,) = struct.unpack("<Q", data[:8])
    if n == 0 or n > MAX_HEADER or 8 + n > len(data):
        raise WeightsFormatError(f"no valid safetensors header (declared length {n}); {_SAVE_HINT}")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise WeightsFormatError(f"the safetensors header is not JSON; {_SAVE_HINT}") from None
    if not isinstance(header, dict):
        raise WeightsFormatError("the safetensors header is not a JSON object")
    body = len(data) - 8 - n
    tensors: dict[str, dict[str, Any]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or info.get("dtype") not in DTYPE_SIZES:
            raise WeightsFormatError(f"tensor {name!r}: unknown or missing dtype")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
        ):
            raise WeightsFormatError(f"tensor {name!r}: malformed shape or data_offsets")
        begin, end = offsets
        count = 1
        for d in shape:
            count *= d
        if not 0 <= begin <= end <= body or end - begin != count * DTYPE_SIZES[info["dtype"]]:
            raise WeightsFormatError(f"tensor {name!r}: its byte range does not fit its shape and the file")
        tensors[name] = {"dtype": info["dtype"], "shape": shape, "data_offsets": [begin, end]}
    if not tensors:
        raise WeightsFormatError("the safetensors file holds no tensors")
    return tensors


def canonical_sha256(data: bytes) -> str:
    """The canonical parameter hash (see docs/privacy.md): SHA-256 of the tensors re-serialised by
    safetensors without metadata. Loading safetensors runs no code; call it on validated files only."""
    from safetensors.torch import load, save

    return hashlib.sha256(save(load(data))).hexdigest()


def check_format(data: bytes) -> tuple[dict[str, Any], dict[str, dict[str, Any]] | None]:
    try:
        tensors = parse_safetensors(data)
    except WeightsFormatError as e:
        return result("format", "fail", str(e)), None
    total = sum(len_ for len_ in (t["data_offsets"][1] - t["data_offsets"][0] for t in tensors.values()))
    return result(
        "format", "pass", f"safetensors with {len(tensors)} tensors ({total} bytes of parameters)", tensors=len(tensors)
    ), tensors


def check_training_record(run: dict[str, Any] | None, *, project: str, budget_for) -> dict[str, Any]:
    """Is there a settled DP run in the ledger for these parameters, for this project, within the budget?

    ``run`` is the ledger's row (``paitient.services.ledger.store.Ledger.record_by_hash``): project, dataset,
    epsilon_spent, delta_spent, and the training ``record``. ``budget_for(dataset)`` returns the
    project's total :class:`paitient.config.Budget` for a dataset.
    """
    if run is None:
        return result(
            "training_record",
            "fail",
            "no training record in the privacy ledger matches these parameters: export only the weights "
            "that paitient.kernel.dp training saved, unchanged",
        )
    summary = summarise_run(run)
    if run.get("project") != project:
        return result(
            "training_record",
            "fail",
            f"the matching training record belongs to project {run.get('project')!r}, not {project!r}",
            record=summary,
        )
    dataset = str(run.get("dataset", ""))
    try:
        budget = budget_for(dataset)
    except (KeyError, ValueError) as e:
        return result("training_record", "fail", f"the record names dataset {dataset!r}: {e}", record=summary)
    eps = run.get("epsilon_spent", run.get("epsilon"))
    delta = run.get("delta_spent", run.get("delta"))
    if not isinstance(eps, int | float) or not isinstance(delta, int | float):
        return result("training_record", "fail", "the training record has no epsilon/delta spent", record=summary)
    if eps > budget.epsilon or delta > budget.delta:
        return result(
            "training_record",
            "fail",
            f"the run spent epsilon={eps:g}, delta={delta:g}, beyond the project's budget for {dataset} "
            f"(epsilon={budget.epsilon:g}, delta={budget.delta:g})",
            record=summary,
        )
    return result(
        "training_record",
        "pass",
        f"trained with differential privacy on {dataset}: epsilon={eps:g}, delta={delta:g} "
        f"(budget epsilon={budget.epsilon:g}, delta={budget.delta:g})",
        record=summary,
    )


def summarise_run(run: dict[str, Any]) -> dict[str, Any]:
    """The parts of a ledger run a steward needs to see (flat, JSON-safe)."""
    out = {
        k: run.get(k)
        for k in ("id", "project", "dataset", "username", "epsilon_spent", "delta_spent", "closed", "weights_sha256")
    }
    record = run.get("record") or {}
    if isinstance(record, dict):
        out.update({f"record.{k}": v for k, v in record.items()})
    return out


def canonical_bytes(data: bytes) -> bytes:
    """The weights as the airlock stores and releases them: validated (:func:`parse_safetensors`), then the
    tensors re-serialised by safetensors without metadata, so ``sha256(canonical_bytes(x)) ==
    canonical_sha256(x)``. Raises :class:`WeightsFormatError` for anything but safetensors."""
    from safetensors.torch import load, save

    parse_safetensors(data)
    try:
        return save(load(data))
    except Exception as e:
        raise WeightsFormatError(f"the safetensors file does not load ({type(e).__name__}); {_SAVE_HINT}") from None
