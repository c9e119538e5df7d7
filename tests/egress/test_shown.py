"""What JupyterLab shows of a cell's stream, followed from one message to the next (paitient.rules.shown)."""

from __future__ import annotations

import pytest

from paitient.rules.shown import CONTEXT, MAX_LINE, StreamLine, TooManyOverwrites, follow, follow_stream


def shown(*texts: str) -> bytes:
    out = bytearray()
    cursor = 0
    for text in texts:
        cursor = follow(out, cursor, text.encode()).cursor
    return bytes(out)


@pytest.mark.parametrize(
    ("texts", "want"),
    [
        (("Z3.71", "\r1"), b"13.71"),
        (("13.71x", "\b,20.83"), b"13.71,20.83"),
        (("ro", "w:7\n"), b"row:7\n"),
        (("abc\rX", "\n", "d"), b"Xbc\nd"),  # a line feed goes to the end, not the cursor
        (("a\n\b\bb",), b"a\nb"),  # no backspace across a line's end
        (("abcd\r\bX",), b"Xbcd"),
        (("abcdef\rab\bX",), b"aXef"),  # a backspace takes the character before the cursor and the one under it
    ],
)
def test_messages_of_a_stream_show_what_one_text_of_them_shows(texts, want):
    assert shown(*texts) == want
    assert shown("".join(texts)) == want


def test_a_message_is_read_with_the_line_it_changes_and_no_more():
    first, line = follow_stream(None, "stdout", "row:1\nZow:2")
    assert first == b"" and line == StreamLine("stdout", b"Zow:2", 5)  # its own text, on lines of its own
    region, line = follow_stream(line, "stdout", "\rr")
    assert region == b"row:2" and line.cursor == 1
    # another stream starts an output of its own
    region, other = follow_stream(line, "stderr", "\rr")
    assert region == b"r" and other == StreamLine("stderr", b"r", 1)
    # on a long line, what a message changes and CONTEXT bytes on either side
    _, long = follow_stream(None, "stdout", "x" * 50_000)
    region, _ = follow_stream(long, "stdout", "\rAB")
    assert region == b"AB" + b"x" * CONTEXT
    region, _ = follow_stream(long, "stdout", "tail")
    assert region == b"x" * CONTEXT + b"tail"


def test_a_line_longer_than_the_head_kept_is_followed_from_its_start():
    _, line = follow_stream(None, "stdout", "Z" + "x" * (2 * MAX_LINE))
    assert len(line.head) == MAX_LINE and line.cursor == 2 * MAX_LINE + 1
    region, line = follow_stream(line, "stdout", "\r1")
    assert region.startswith(b"1xxx") and line.cursor == 1


def test_backspaces_that_would_cost_too_much_are_refused():
    with pytest.raises(TooManyOverwrites, match="backspaces and carriage returns"):
        follow(bytearray(b"A" * 2_000_000), 0, b"x\b" * 100_000)
