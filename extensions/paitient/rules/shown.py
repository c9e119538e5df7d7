"""What JupyterLab shows of a stream's text: the backspaces, carriage returns and line feeds it follows. Pure.

JupyterLab's output area (4.x, ``processText``) writes a stream's text at a cursor, as a terminal does: a
backspace removes the character before the cursor (and the one under it; not across a line's end), a
carriage return moves the cursor to its line's start, where what follows overwrites the line, and a line
feed starts a new line at the end. Consecutive messages of one stream (``stdout`` or ``stderr``) of one
cell go on at the cursor the last one left. So a kernel can print ``Z3.71`` in one message and ``\\r1`` in
the next, neither of which shows a number of a dataset, and JupyterLab shows ``13.71``.

:func:`follow` is that algorithm. The egress gate's row detection reads a text as JupyterLab shows it
(:func:`paitient.rules.edm.tokens.as_lab_shows`), and the user's server follows each cell's stream from one
message to the next (:class:`StreamLine`, :func:`follow_stream`) to give it the text a message changed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_WORK = 1 << 24
"""The most bytes :func:`follow` moves for one text: a text that needs more is refused
(:class:`TooManyOverwrites`) rather than followed at quadratic cost."""
MAX_LINE = 1 << 16
"""The bytes of a stream's last line kept from one message to the next (its head: a carriage return goes back
to the line's start, which the head keeps; what is written past it is not followed)."""
CONTEXT = 4096
"""Bytes of the shown line on either side of what a message changed, read with it: a row printed a value at
a time, or a value written over another, is read whole."""
CONTROLS = re.compile(rb"[\n\x08\r]")
_SPLIT = re.compile(rb"([\n\x08\r])")


class TooManyOverwrites(ValueError):
    """A text whose backspaces and carriage returns would move more than :data:`MAX_WORK` bytes."""


@dataclass(frozen=True)
class Followed:
    cursor: int
    """Where the cursor is after the text."""
    low: int
    """The first position the text wrote to or removed from."""
    high: int
    """The position after the last one the text wrote to (its end when it wrote nothing)."""


def follow(out: bytearray, cursor: int, text: bytes) -> Followed:
    """Write ``text`` into ``out`` (what is shown so far, the cursor at ``cursor``) as JupyterLab does:
    ``out`` is changed in place. :class:`TooManyOverwrites` when that would move more than :data:`MAX_WORK`
    bytes."""
    cursor = min(max(cursor, 0), len(out))
    line = out.rfind(b"\n", 0, cursor) + 1
    low, high, work = cursor, -1, 0
    for part in _SPLIT.split(text) if CONTROLS.search(text) else (text,):
        if part == b"\n":
            out += b"\n"
            low, cursor = min(low, len(out) - 1), len(out)
            line = high = cursor
        elif part == b"\x08":
            if cursor > line:
                work += len(out) - cursor
                del out[cursor - 1 : cursor + 1]
                cursor -= 1
                low = min(low, cursor)
        elif part == b"\r":
            cursor = line
        elif part:
            end = cursor + len(part)
            if end < len(out):
                work += len(part)
            out[cursor:end] = part
            low, cursor = min(low, cursor), end
            high = max(high, end)
        if work > MAX_WORK:
            raise TooManyOverwrites(
                f"the text's backspaces and carriage returns overwrite it more than {MAX_WORK} bytes' worth"
            )
    return Followed(cursor=cursor, low=low, high=max(high, cursor))


@dataclass(frozen=True)
class StreamLine:
    """The last line a cell's stream shows in JupyterLab, as far as the next message of it may change it."""

    name: str
    """``stdout`` or ``stderr``: a message of the other stream starts an output of its own."""
    head: bytes = b""
    """The line's first :data:`MAX_LINE` bytes as shown."""
    cursor: int = 0


def follow_stream(line: StreamLine | None, name: str, text: str) -> tuple[bytes, StreamLine]:
    """What a message of stream ``name`` with ``text`` makes JupyterLab show, where it goes on from ``line``
    (the stream's last line before it; None: it starts an output): the shown text around what the message
    changed (:data:`CONTEXT` bytes on either side, from the line's start at most), and the stream's last line
    after it. The text is empty where the message shows exactly its own text on lines of its own (a message
    after a line feed, with no backspace or carriage return), which the gate reads anyway."""
    data = text.encode("utf-8", "surrogatepass")
    if line is None or line.name != name:
        line = StreamLine(name)
    out = bytearray(line.head)
    done = follow(out, line.cursor, data)
    last = out.rfind(b"\n") + 1
    after = StreamLine(name, bytes(out[last : last + MAX_LINE]), done.cursor - last)
    if not line.head and b"\x08" not in data and b"\r" not in data:
        return b"", after
    return bytes(out[max(0, done.low - CONTEXT) : done.high + CONTEXT]), after
