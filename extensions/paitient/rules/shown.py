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
from array import array
from dataclasses import dataclass
from typing import Any

MAX_WORK = 1 << 24
"""The most characters :func:`follow` moves for one text: a text that needs more is refused
(:class:`TooManyOverwrites`) rather than followed at quadratic cost."""
MAX_LINE = 1 << 16
"""The characters of a stream's last line kept from one message to the next (its head: a carriage return goes back
to the line's start, which the head keeps; what is written past it is not followed)."""
CONTEXT = 4096
"""Characters of the shown line on either side of what a message changed, read with it: a row printed a value at
a time, or a value written over another, is read whole."""
_CONTROLS = re.compile(r"[\n\x08\r]")
_SPLIT = re.compile(r"([\n\x08\r])")


class TooManyOverwrites(ValueError):
    """A text whose backspaces and carriage returns would move more than :data:`MAX_WORK` characters."""


@dataclass(frozen=True)
class Followed:
    cursor: int
    """Where the cursor is after the text."""
    low: int
    """The first position the text wrote to or removed from."""
    high: int
    """The position after the last one the text wrote to (its end when it wrote nothing)."""


def follow(out: array[int], cursor: int, text: str) -> Followed:
    """Write ``text`` into ``out`` (what is shown so far, UTF-16 code units, the cursor at ``cursor``, no line
    feed before it) as JupyterLab does: ``out`` is changed in place. A backspace removes a code unit, as in
    JupyterLab's strings (``\u00e9\b`` leaves nothing of the ``\u00e9``, ``\U0001f600\b`` half of the emoji).
    :class:`TooManyOverwrites` when that would move more than :data:`MAX_WORK` code units."""
    cursor = min(max(cursor, 0), len(out))
    line = 0
    low, high, work = cursor, -1, 0
    for part in _SPLIT.split(text) if _CONTROLS.search(text) else (text,):
        if part == "\n":
            out.append(10)
            low, cursor = min(low, len(out) - 1), len(out)
            line = high = cursor
        elif part == "\x08":
            if cursor > line:
                work += len(out) - cursor
                del out[cursor - 1 : cursor + 1]
                cursor -= 1
                low = min(low, cursor)
        elif part == "\r":
            cursor = line
        elif part:
            points = code_points(part)
            end = cursor + len(points)
            if end < len(out):
                work += len(points)
            out[cursor:end] = points
            low, cursor = min(low, cursor), end
            high = max(high, end)
        if work > MAX_WORK:
            raise TooManyOverwrites(
                f"its backspaces and carriage returns overwrite it more than {MAX_WORK:,} characters' worth, "
                "more than the workspace follows to read what it shows"
            )
    return Followed(cursor=cursor, low=low, high=max(high, cursor))


def code_points(text: str) -> array[int]:
    """``text`` as an array of its UTF-16 code units, as JupyterLab's strings hold it: a character beyond
    the BMP is two (``\U0001f600\b\b`` leaves nothing of it, one backspace half of it)."""
    units = array("H")
    units.frombytes(text.encode("utf-16-le", "surrogatepass"))
    return units


def text_of(units: array[int]) -> str:
    """The text of UTF-16 code units (a half of a character left alone kept as a lone surrogate)."""
    return units.tobytes().decode("utf-16-le", "surrogatepass")


def shown(text: str) -> str:
    """``text`` as JupyterLab shows it, written into an empty output."""
    if "\x08" not in text and "\r" not in text:
        return text
    out = array("H")
    follow(out, 0, text)
    return text_of(out)


@dataclass(frozen=True)
class StreamLine:
    """The last line a cell's stream shows in JupyterLab, as far as the next message of it may change it."""

    name: str
    """``stdout`` or ``stderr``: a message of the other stream starts an output of its own."""
    head: str = ""
    """The line's first :data:`MAX_LINE` characters as shown."""
    cursor: int = 0


def follow_stream(line: StreamLine | None, name: str, text: str) -> tuple[str, StreamLine]:
    """What a message of stream ``name`` with ``text`` makes JupyterLab show, where it goes on from ``line``
    (the stream's last line before it; None: it starts an output): the shown text around what the message
    changed (:data:`CONTEXT` code units on either side, from the line's start at most), and the stream's last
    line after it. The text is empty where the message shows exactly its own text on lines of
    its own (a message after a line feed, with no backspace or carriage return), which the gate reads anyway."""
    if line is None or line.name != name:
        line = StreamLine(name)
    out = code_points(line.head)
    done = follow(out, line.cursor, text)
    shown_text = text_of(out)
    last = shown_text.rfind("\n") + 1
    after = StreamLine(name, shown_text[last : last + MAX_LINE], done.cursor - last)
    if not line.head and "\x08" not in text and "\r" not in text:
        return "", after
    return shown_text[max(0, done.low - CONTEXT) : done.high + CONTEXT], after


def merged_streams(value: Any) -> Any:
    """``value`` (a message's content, a notebook's cells, a widget's state) with each run of consecutive
    stream outputs of one name in a list of outputs joined into one, as JupyterLab joins them when it loads
    outputs (a notebook, an ``Output`` widget's state): a value cut in two at an output's end is then one
    value in the text the gate reads, as on the screen. What is not a list of outputs is returned as it is."""
    if isinstance(value, dict):
        changed = {k: merged_streams(v) for k, v in value.items()}
        return changed if any(changed[k] is not value[k] for k in value) else value
    if not isinstance(value, list):
        return value
    items = [merged_streams(v) for v in value]
    out: list[Any] = []
    for item in items:
        last: Any = out[-1] if out else None
        if _is_stream(item) and _is_stream(last) and item.get("name") == last.get("name"):
            out[-1] = {**last, "text": _stream_text(last) + _stream_text(item)}
        else:
            out.append(item)
    return out if len(out) != len(value) or any(a is not b for a, b in zip(out, value, strict=True)) else value


def _is_stream(item: Any) -> bool:
    return isinstance(item, dict) and item.get("output_type") == "stream" and isinstance(_stream_text(item), str)


def _stream_text(item: dict[str, Any]) -> Any:
    text = item.get("text")
    if isinstance(text, list) and all(isinstance(t, str) for t in text):
        return "".join(text)
    return text
