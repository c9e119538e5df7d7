"""What may leave for the browser: the limits, the verdicts and the notices of the egress gate. Pure.

Everything that reaches a researcher's browser is egress, whatever path it takes. The root-side egress
service keeps the counts (rows of each dataset an output revealed, rows and bytes a user received today) and
asks :func:`decide`; the gate in the user's server applies the verdict. The texts a researcher sees when an
output is withheld are built here, so the gate, the service and the tests say the same thing.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

MB = 1_000_000


class Limits(Protocol):
    """The egress limits of a user (the site model's ``EgressLimits``: [egress] and projects' overrides)."""

    max_rows_per_output: int
    daily_rows: int
    daily_bytes: int
    fail_closed_bytes: int
    unchecked_bytes: int


class Verdict(enum.Enum):
    FORWARD = "forward"
    WITHHOLD = "withhold"


class Reason(enum.Enum):
    ROWS = "rows"
    """The output shows more rows of a dataset than one output may."""
    DAILY_ROWS = "daily_rows"
    """The user has seen as many dataset rows today as allowed."""
    DAILY_BYTES = "daily_bytes"
    """The user has received as many bytes today as allowed."""
    UNCHECKED = "unchecked"
    """Rows could not be matched, or the audit trail could not record, and the output is not small."""
    UNREADABLE = "unreadable"
    """The output holds what makes a browser show it otherwise than the row detection can read it (bidirectional
    controls, overwrites beyond the bound)."""


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: Reason | None = None
    notice: str = ""

    @property
    def forward(self) -> bool:
        return self.verdict is Verdict.FORWARD


FORWARD = Decision(Verdict.FORWARD)


def decide(
    limits: Limits,
    *,
    output_rows: Mapping[str, int],
    new_day_rows: int,
    day_rows: int,
    day_bytes: int,
    size: int,
    checked: bool = True,
    unchecked_spent: int = 0,
    unreadable: str = "",
) -> Decision:
    """The verdict on one piece of output.

    ``output_rows``: dataset -> distinct rows the whole output (this piece and what went before it in the
    same execution, file or notebook) reveals; ``new_day_rows``: rows this piece would add to what the user
    saw today; ``day_rows``/``day_bytes``: today's totals before this piece; ``size``: its bytes;
    ``checked``: False when the rows could not be matched or the trail could not record;
    ``unchecked_spent``: bytes that passed unchecked since outputs were last checked; ``unreadable``: why
    the row detection refused to read the piece, which is then withheld whatever its size.
    """
    if unreadable:
        return Decision(Verdict.WITHHOLD, Reason.UNREADABLE, unreadable_notice(unreadable))
    if not checked:
        refusal = unchecked(size, unchecked_spent, limits.fail_closed_bytes, limits.unchecked_bytes)
        if refusal is not None:
            return refusal
    over = {ds: n for ds, n in output_rows.items() if n > limits.max_rows_per_output}
    if over:
        return Decision(Verdict.WITHHOLD, Reason.ROWS, rows_notice(over, limits.max_rows_per_output))
    if new_day_rows and day_rows + new_day_rows > limits.daily_rows:
        return Decision(Verdict.WITHHOLD, Reason.DAILY_ROWS, daily_rows_notice(limits.daily_rows))
    if day_bytes + size > limits.daily_bytes:
        return Decision(Verdict.WITHHOLD, Reason.DAILY_BYTES, daily_bytes_notice(limits.daily_bytes))
    return FORWARD


TEXT_SHARE = 0.75
"""A binary buffer is scanned as text when at least this share of its characters decode as text."""

_CONTROL = bytes(b for b in range(32) if b not in b"\t\n\r") + b"\x7f"


def looks_like_text(data: bytes) -> bool:
    """Whether a binary buffer (of a comm message, display data) is text to scan for rows: valid UTF-8 with
    no control characters, or mostly so (at least :data:`TEXT_SHARE` of it), so that a stray byte does not
    turn a table into "binary". What fails this (images, packed numbers, compressed or encrypted bytes) is
    counted against the day's bytes but cannot be read for rows."""
    if not data:
        return False
    chars = data.decode("utf-8", errors="replace")
    bad = chars.count("\ufffd") + len(data) - len(data.translate(None, _CONTROL))
    return bad <= (1 - TEXT_SHARE) * len(chars)


def unchecked(size: int, spent: int, fail_closed_bytes: int, allowance: int) -> Decision | None:
    """The refusal of a piece of ``size`` bytes that cannot be checked, when ``spent`` bytes passed unchecked
    since outputs were last checked; None: it may pass (not above ``fail_closed_bytes``, and within the
    ``allowance``, the ``unchecked_bytes`` limit)."""
    if size > fail_closed_bytes:
        return Decision(Verdict.WITHHOLD, Reason.UNCHECKED, unchecked_notice(size))
    if spent + size > allowance:
        return Decision(Verdict.WITHHOLD, Reason.UNCHECKED, unchecked_spent_notice(allowance))
    return None


# ---------------------------------------------------------------------------------------------------
# What the researcher reads

AIRLOCK_HINT = (
    "aggregate it (counts, means, a model's metrics), or request it through the airlock: "
    'from paitient import airlock; airlock.request("file.csv", kind="table", justification="...")'
)


def _dataset_name(key: str) -> str:
    return key.split("/", 1)[-1]


def rows_notice(over: Mapping[str, int], limit: int) -> str:
    shown = ", ".join(f"{n:,} rows of {_dataset_name(ds)}" for ds, n in sorted(over.items()))
    return (
        f"[paitient] output withheld: it shows {shown} (at most {limit} rows of a dataset may reach the "
        f"browser in one output). Row-level data stays in the workspace: {AIRLOCK_HINT}."
    )


def daily_rows_notice(limit: int) -> str:
    return (
        f"[paitient] output withheld: you have seen {limit} dataset rows today, the most a day allows. "
        f"Outputs without dataset rows still show; tomorrow the count starts again. {AIRLOCK_HINT[0].upper()}"
        f"{AIRLOCK_HINT[1:]}."
    )


def daily_bytes_notice(limit: int) -> str:
    return (
        f"[paitient] output withheld: you have received {limit / MB:,.0f} MB from the workspace today, the "
        "most a day allows (images and files count too). Tomorrow the count starts again; a data steward can "
        "tell you your project's limit. Results to keep go out through the airlock."
    )


def unchecked_notice(size: int) -> str:
    return (
        f"[paitient] output withheld: the workspace cannot check outputs right now, and this one "
        f"({size:,} bytes) is too large to pass unchecked. Run the cell again in a minute; if this stays, "
        "ask the workspace operator."
    )


def unaskable_notice() -> str:
    return (
        "[paitient] output withheld: it could not be checked, as the request it answers carries names too long "
        "to check (a message id of thousands of characters, say). Run the cell again from JupyterLab; if this "
        "stays, ask the workspace operator."
    )


def unreadable_notice(why: str) -> str:
    return (
        f"[paitient] output withheld: {why}. Print it without them (for text in a right-to-left script, "
        "without explicit direction marks); to take such a result out, request it through the airlock."
    )


def unchecked_spent_notice(allowance: int) -> str:
    return (
        "[paitient] output withheld: the workspace cannot check outputs right now, and the small outputs that "
        f"may pass unchecked meanwhile ({allowance:,} bytes in all) have passed. Outputs show again once they can "
        "be checked: run the cell again in a minute; if this stays, ask the workspace operator."
    )


def file_notice(path: str, what: str) -> str:
    return (
        f"{path} is {what}. Data files do not open in the browser: they stay in the workspace, where your "
        "notebooks can read them. To take a result out, request it through the airlock: "
        'from paitient import airlock; airlock.request("' + path + '", kind="table", justification="...")'
    )


# ---------------------------------------------------------------------------------------------------
# The wire between the gate and the egress service: length-prefixed frames on a unix socket
#
# A frame is a 4-byte big-endian length n, then n bytes of JSON header; the header's "payload" (bytes, 0
# if absent) says how many raw bytes follow. One connection carries many requests, answered in order.

#
# In a Kubernetes pod the connection is carried by the pod's relay and the services' gateway; the gateway opens
# it with one frame of its own, ``{"op": ON_BEHALF, "on_behalf": {uid, pod, origin, pid, start}}``, which names
# the pod's server it carries (paitient.services.kit.channel.delegated_peer), and the egress service answers
# it before any frame of the server.

MAX_HEADER = 64 * 1024
MAX_PAYLOAD = 64 * MB
ON_BEHALF = "on_behalf"
_LEN = struct.Struct(">I")


class FrameError(ValueError):
    """A frame that breaks the protocol; the connection is closed."""


def encode_frame(header: Mapping[str, Any], payload: bytes = b"") -> bytes:
    head = dict(header)
    head["payload"] = len(payload)
    raw = json.dumps(head, separators=(",", ":")).encode()
    if len(raw) > MAX_HEADER:
        raise FrameError(f"frame header of {len(raw)} bytes; at most {MAX_HEADER}")
    return _LEN.pack(len(raw)) + raw + payload


def header_length(prefix: bytes) -> int:
    n = int(_LEN.unpack(prefix)[0])
    if not 0 < n <= MAX_HEADER:
        raise FrameError(f"frame header length {n} out of range")
    return n


def read_header(read: Callable[[int], bytes]) -> tuple[dict[str, Any], int]:
    """The next frame's header and its payload's length, from ``read(n)``, which gives exactly n bytes."""
    return decode_header(read(header_length(read(4))))


def decode_header(raw: bytes) -> tuple[dict[str, Any], int]:
    """The header and the number of payload bytes that follow it."""
    try:
        head = json.loads(raw)
    except (ValueError, RecursionError):
        raise FrameError("frame header is not JSON") from None
    if not isinstance(head, dict):
        raise FrameError("frame header is not a JSON object")
    size = head.get("payload", 0)
    if not isinstance(size, int) or not 0 <= size <= MAX_PAYLOAD:
        raise FrameError(f"payload size {size!r} out of range (at most {MAX_PAYLOAD})")
    return head, size
