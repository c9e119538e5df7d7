"""The signed record of a certified training job: what the runner did, bound to the weights it produced.

A record states facts the runner established itself, never ones a kernel reported: the dataset version it
read, the rows it trained on and held out, the graph it executed (by SHA-256), how it initialised the
parameters, its privacy parameters and what its accountant spent, the SHA-256 of the weights file it wrote,
and the metrics it computed on its held-out split. Every field is typed and bounded (:data:`FIELDS`), so a
record carries numbers and names, not text for a reader to interpret.

The runner signs the record with the workspace's Ed25519 key (root-only); anyone holding the published
public key checks it offline (:func:`verify`). What is signed is the *envelope's* canonical JSON: the
format, the key id and the record, keys sorted, no whitespace, ASCII only, no NaN. A record edited after
signing, one signed with another key, and weights whose SHA-256 is not the record's all fail, each with
its own reason. Pure: no files, no clock (the caller passes the time it ran).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

FORMAT = "paitient.training-record/1"
ACCOUNTANTS = ("rdp", "prv")
MAX_FEATURES = 4096
MAX_NAME = 200
MAX_METRICS = 32
MAX_PREPROCESSING_BYTES = 64_000

_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,200}")
_JOB_ID = re.compile(r"[0-9a-z][0-9a-z-]{3,63}")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", re.ASCII)


class RecordInvalid(ValueError):
    """A record that cannot be trusted or built; the message says which check failed and why."""


@dataclass(frozen=True)
class Field:
    check: Callable[[Any], bool]
    rule: str
    """What a valid value is, for the error message."""


def _int(lo: int, hi: int = 2**53) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _float(ok: Callable[[float], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v)) and ok(float(v))


def _name(v: Any) -> bool:
    return isinstance(v, str) and _NAME.fullmatch(v) is not None


def _hex64(v: Any) -> bool:
    return isinstance(v, str) and _HEX64.fullmatch(v) is not None


def _features(v: Any) -> bool:
    return isinstance(v, list) and 1 <= len(v) <= MAX_FEATURES and all(map(_name, v)) and len(set(v)) == len(v)


def _preprocessing(v: Any) -> bool:
    if not isinstance(v, list) or not all(isinstance(step, dict) and _name(step.get("op")) for step in v):
        return False
    try:
        return len(_dumps(v)) <= MAX_PREPROCESSING_BYTES
    except ValueError:  # NaN or infinity in a step
        return False


def _initialisation(v: Any) -> bool:
    if not isinstance(v, dict):
        return False
    if set(v) == {"scheme", "seed"}:
        return _name(v["scheme"]) and _int(0, 2**63 - 1)(v["seed"])
    return set(v) == {"checkpoint", "name"} and _hex64(v["checkpoint"]) and _name(v["name"])


def _metrics(v: Any) -> bool:
    return (
        isinstance(v, dict)
        and len(v) <= MAX_METRICS
        and all(_name(k) and _float(lambda x: abs(x) <= 1e9)(x) for k, x in v.items())
    )


FIELDS: dict[str, Field] = {
    "job_id": Field(lambda v: isinstance(v, str) and _JOB_ID.fullmatch(v) is not None, "a job id (a-z, 0-9, -)"),
    "project": Field(_name, "a project name"),
    "dataset": Field(_name, "a dataset name"),
    "dataset_version": Field(_int(1), "a version number of at least 1"),
    "dataset_sha256": Field(_hex64, "the SHA-256 of the dataset version's data file (64 hex digits)"),
    "n_train": Field(_int(1), "the number of rows trained on (at least 1)"),
    "n_holdout": Field(_int(0), "the number of held-out rows (0 or more)"),
    "features": Field(_features, f"a list of 1 to {MAX_FEATURES} distinct column names"),
    "target": Field(_name, "the target column's name"),
    "preprocessing": Field(_preprocessing, "a list of declarative steps, each an object with an 'op'"),
    "graph_sha256": Field(_hex64, "the SHA-256 of the model graph the runner executed"),
    "initialisation": Field(_initialisation, "{'scheme': name, 'seed': n} or {'checkpoint': sha256, 'name': name}"),
    "sampling_rate": Field(_float(lambda x: 0 < x <= 1), "a Poisson sampling rate in (0, 1]"),
    "noise_multiplier": Field(_float(lambda x: x > 0), "a noise multiplier above 0"),
    "max_grad_norm": Field(_float(lambda x: x > 0), "a clipping bound above 0"),
    "steps": Field(_int(1), "the number of optimiser steps (at least 1)"),
    "epsilon": Field(_float(lambda x: x >= 0), "the epsilon the accountant spent (0 or more)"),
    "delta": Field(_float(lambda x: 0 < x < 1), "the delta of the guarantee, in (0, 1)"),
    "accountant": Field(lambda v: v in ACCOUNTANTS, f"one of {', '.join(ACCOUNTANTS)}"),
    "weights_sha256": Field(_hex64, "the SHA-256 of the weights file (64 hex digits)"),
    "metrics": Field(_metrics, f"at most {MAX_METRICS} named finite numbers"),
    "runner_version": Field(_name, "the runner's version"),
    "finished": Field(lambda v: isinstance(v, str) and _TIME.fullmatch(v) is not None, "a UTC time, ISO 8601 'Z'"),
}


def check_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` as a plain dict if every field of :data:`FIELDS` is there and valid, and nothing else is."""
    if not isinstance(record, Mapping):
        raise RecordInvalid("a training record is a JSON object")
    missing = [k for k in FIELDS if k not in record]
    extra = sorted(k for k in record if k not in FIELDS)
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(map(str, extra))}"] if extra else []
        )
        raise RecordInvalid(f"the training record's fields do not fit its format: {'; '.join(parts)}")
    for name, spec in FIELDS.items():
        if not spec.check(record[name]):
            raise RecordInvalid(f"the training record's {name} must be {spec.rule}; got {record[name]!r:.80}")
    return {k: record[k] for k in FIELDS}


def _dumps(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def key_id(public: Ed25519PublicKey) -> str:
    """A public key's id: the first 16 hex digits of the SHA-256 of its 32 raw bytes."""
    return hashlib.sha256(public.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:16]


def _signed_part(kid: str, record: dict[str, Any]) -> bytes:
    return _dumps({"format": FORMAT, "key_id": kid, "record": record})


def sign(record: Mapping[str, Any], private: Ed25519PrivateKey) -> dict[str, Any]:
    """The envelope of a checked ``record``: format, key id, record and the Ed25519 signature (base64)."""
    checked = check_record(record)
    kid = key_id(private.public_key())
    signature = private.sign(_signed_part(kid, checked))
    return {"format": FORMAT, "key_id": kid, "record": checked, "signature": base64.b64encode(signature).decode()}


def parse_envelope(data: bytes | str) -> Any:
    """A record file's JSON, with no key twice in any object: JSON keeps the last of two, so a file could carry
    other values before the signed ones, which a reader taking the first would see. Raises
    :class:`RecordInvalid` (not JSON, or a key twice)."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise RecordInvalid(f"the record file names {key!r:.40} twice; a signed record names each field once")
            out[key] = value
        return out

    try:
        return json.loads(data, object_pairs_hook=unique)
    except RecordInvalid:
        raise
    except ValueError as e:
        raise RecordInvalid(f"the record file is not JSON ({e})") from None


def verify(envelope: Any, public: Ed25519PublicKey, weights: bytes | None = None) -> dict[str, Any]:
    """The record of ``envelope`` if ``public`` signed it as it is (and, given ``weights``, they are the
    record's); raises :class:`RecordInvalid` naming the check that failed."""
    if not isinstance(envelope, Mapping) or set(envelope) != {"format", "key_id", "record", "signature"}:
        raise RecordInvalid("not a signed training record: it needs exactly format, key_id, record and signature")
    if envelope["format"] != FORMAT:
        raise RecordInvalid(f"record format {envelope['format']!r:.40} is not {FORMAT}")
    expected = key_id(public)
    if envelope["key_id"] != expected:
        raise RecordInvalid(
            f"the record names signing key {envelope['key_id']!r:.40}, not this workspace's {expected}: "
            "it was signed elsewhere, or for another key"
        )
    try:
        signature = base64.b64decode(envelope["signature"], validate=True)
    except (TypeError, ValueError):
        raise RecordInvalid("the record's signature is not base64") from None
    record = envelope["record"]
    try:
        public.verify(signature, _signed_part(expected, dict(record) if isinstance(record, Mapping) else record))
    except (InvalidSignature, TypeError, ValueError):
        raise RecordInvalid(
            "the signature does not match the record: it was changed after it was signed, or signed with another key"
        ) from None
    checked = check_record(record)
    if weights is not None:
        got = hashlib.sha256(weights).hexdigest()
        if got != checked["weights_sha256"]:
            raise RecordInvalid(
                f"the weights' SHA-256 is {got}, the signed record's {checked['weights_sha256']}: "
                "these are not the weights the runner trained"
            )
    return checked


def public_key_from_bytes(raw: bytes) -> Ed25519PublicKey:
    """A public key from its published form: 32 raw bytes, or their base64 on one line."""
    data = raw.strip()
    if len(data) != 32:
        try:
            data = base64.b64decode(data, validate=True)
        except ValueError:
            raise RecordInvalid("the public key is neither 32 raw bytes nor their base64") from None
    if len(data) != 32:
        raise RecordInvalid(f"an Ed25519 public key has 32 bytes, not {len(data)}")
    return Ed25519PublicKey.from_public_bytes(data)


def public_key_text(public: Ed25519PublicKey) -> str:
    """The published form of a public key: base64 of its 32 raw bytes, one line."""
    return base64.b64encode(public.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode() + "\n"
