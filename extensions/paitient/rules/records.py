"""Audit records as plain data: building, canonical form, hashing, and size caps. No file handling here.

A record is one JSON object per line::

    {"time": "2026-11-28T17:06:51.123456Z", "seq": 42, "actor": "alice", "action": "cell.execute",
     "object": "demo/heart", "outcome": "ok", "details": {...}, "prev": "<hash of record 41>", "hash": "..."}

``hash`` is the SHA-256 (hex) of the canonical JSON of the record without ``hash``: keys sorted, no
spaces, ASCII only. Each record names the hash of the one before it, so changing, removing, inserting or
reordering a record breaks the chain at that point.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from typing import Any, NotRequired, TypedDict, Unpack

GENESIS = "0" * 64
"""``prev`` of the very first record of a trail."""

FIELDS = ("time", "seq", "actor", "action", "object", "outcome", "details", "prev", "hash")
OUTCOMES = ("ok", "denied", "error")
ACTION_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_-]*)+$")

HEADER_ACTION = "audit.file"
"""The first record of every file: names the file and the previous one; ``prev`` carries the chain over."""
RECOVERED_ACTION = "audit.recovered"
"""Written by the writer when it found a torn or corrupt tail instead of a good last record."""

MAX_OBJECT_CHARS = 1024
MAX_ACTOR_CHARS = 256
MAX_RECORD_BYTES = 1 << 20
"""A record larger than this is refused (root side) or its details are dropped to a digest (user side)."""


class AuditError(Exception):
    """An audit record could not be written (or was refused). Callers decide whether to go on without it.

    ``code`` says why when a service refused or could not be reached (``unavailable``, ``timeout``, ...)."""

    def __init__(self, message: str = "", code: str = ""):
        super().__init__(message)
        self.code = code


class RecordError(AuditError, ValueError):
    """The record itself is malformed: the message names the field and what is accepted."""


def utc_now() -> str:
    """The current time as UTC ISO 8601 with microseconds and a ``Z`` suffix."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(record: dict[str, Any]) -> bytes:
    """The bytes that are hashed: the record without ``hash``, keys sorted, compact, ASCII."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(record)).hexdigest()


def encode(record: dict[str, Any]) -> bytes:
    """One line of the trail (with the newline), fields in their documented order."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode() + b"\n"


def normalise_details(details: dict[str, Any] | None) -> dict[str, Any]:
    """A JSON-clean copy of ``details``: unknown types become strings, NaN/infinity are refused."""
    if details is None:
        return {}
    if not isinstance(details, dict):
        raise RecordError(f"details must be a dict of JSON values, got {type(details).__name__}")
    try:
        clean: dict[str, Any] = json.loads(json.dumps(details, default=str, allow_nan=False))
        return clean
    except (TypeError, ValueError) as e:
        raise RecordError(f"details are not JSON-serialisable ({e}); pass strings, numbers, lists, dicts") from None


def check_fields(actor: object, action: object, object: object, outcome: object) -> None:
    """Refuse a record's fields unless they are what the trail holds; they come from callers, so they are typed
    as anything and checked here."""
    if not isinstance(actor, str) or not actor:
        raise RecordError("actor must be a non-empty string (a username, or 'system' for the workspace itself)")
    if len(actor) > MAX_ACTOR_CHARS:
        raise RecordError(f"actor is longer than {MAX_ACTOR_CHARS} characters; truncate it before logging")
    if not isinstance(action, str) or not ACTION_RE.match(action):
        raise RecordError(f"action {action!r} must be a dotted lower-case name such as 'cell.execute'")
    if not isinstance(object, str):
        raise RecordError(f"object must be a string, got {type(object).__name__}")
    if outcome not in OUTCOMES:
        raise RecordError(f"outcome must be one of {', '.join(OUTCOMES)}; got {outcome!r}")


class Event(TypedDict):
    """An event as its writer gives it; :func:`prepare_event` fills in the defaults and validates it."""

    actor: str
    action: str
    object: NotRequired[str]
    outcome: NotRequired[str]
    details: NotRequired[dict[str, Any] | None]


def prepare_event(
    *, actor: str, action: str, object: str = "", outcome: str = "ok", details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Validate an event and normalise its details, before any lock is taken (see :func:`seal`)."""
    check_fields(actor, action, object, outcome)
    event = {
        "actor": actor,
        "action": action,
        "object": object[:MAX_OBJECT_CHARS],
        "outcome": outcome,
        "details": normalise_details(details),
    }
    size = len(json.dumps(event["details"], separators=(",", ":"))) + len(object) + len(actor) + 400
    if size > MAX_RECORD_BYTES:
        raise RecordError(
            f"record for {action} is larger than {MAX_RECORD_BYTES} bytes; "
            "cap its details (paitient.rules.records.cap_details)"
        )
    return event


def seal(event: dict[str, Any], *, seq: int, prev: str, time: str | None = None) -> dict[str, Any]:
    """The record for a prepared event at position ``seq`` after ``prev``, hash included."""
    record: dict[str, Any] = {"time": time or utc_now(), "seq": seq, **event, "prev": prev}
    record["hash"] = record_hash(record)
    return record


def make_record(*, seq: int, prev: str, time: str | None = None, **event: Unpack[Event]) -> dict[str, Any]:
    """A complete record, hash included. Fields are validated; ``object`` is capped at MAX_OBJECT_CHARS."""
    return seal(prepare_event(**event), seq=seq, prev=prev, time=time)


def parse_line(line: bytes) -> dict[str, Any]:
    """Decode one line into a record whose own hash checks out; raise ValueError saying what is wrong."""
    try:
        record = json.loads(line)
    except ValueError:
        raise ValueError("not a JSON object (line is damaged)") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object (line is damaged)")
    missing = [f for f in FIELDS if f not in record]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    extra = sorted(set(record) - set(FIELDS))
    if extra:
        raise ValueError(f"unexpected field(s) {', '.join(extra)}")
    if not isinstance(record["seq"], int) or isinstance(record["seq"], bool):
        raise ValueError("seq is not a whole number")
    if record_hash(record) != record["hash"]:
        raise ValueError("hash does not match the record's content (the record was altered)")
    return record


# --------------------------------------------------------------------------------------------------
# Size caps for untrusted details


def _digest(text: str) -> dict[str, Any]:
    raw = text.encode("utf-8", "surrogatepass")
    return {"length": len(text), "sha256": hashlib.sha256(raw).hexdigest()}


def cap_strings(value: Any, limit: int) -> Any:
    """Cut every string longer than ``limit`` characters, keeping its length and SHA-256.

    In a dict, ``{"code": <long>}`` becomes ``{"code": <first limit chars>, "code_truncated":
    {"length": n, "sha256": ...}}``; inside a list the string is replaced by ``{"truncated": <prefix>, ...}``.
    Cutting twice keeps the first ``<key>_truncated``: it describes the whole original text, of which the
    kept string is still a prefix.
    """
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        digests: dict[str, Any] = {}
        for k, v in value.items():
            k = str(k)[:limit]
            if isinstance(v, str) and len(v) > limit:
                out[k] = v[:limit]
                digests[f"{k}_truncated"] = _digest(v)
            else:
                out[k] = cap_strings(v, limit)
        for k, d in digests.items():
            if not (isinstance(out.get(k), dict) and {"length", "sha256"} <= set(out[k])):
                out[k] = d
        return out
    if isinstance(value, list):
        return [
            {"truncated": v[:limit], **_digest(v)} if isinstance(v, str) and len(v) > limit else cap_strings(v, limit)
            for v in value
        ]
    return value


def cap_details(details: dict[str, Any], *, string_limit: int, total_limit: int) -> dict[str, Any]:
    """Cap long strings, then, if the details are still larger than ``total_limit`` bytes of JSON,
    replace them by a digest so the record still says that something (and how much) was sent."""
    capped: dict[str, Any] = cap_strings(normalise_details(details), string_limit)
    text = json.dumps(capped, sort_keys=True, separators=(",", ":"))
    if len(text) > total_limit:
        return {"dropped": True, **_digest(text)}
    return capped
