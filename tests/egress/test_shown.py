"""What JupyterLab shows of a cell's stream, followed from one message to the next (paitient.rules.shown)."""

from __future__ import annotations

from array import array

import pytest

from paitient.rules.shown import (
    CONTEXT,
    MAX_LINE,
    StreamLine,
    TooManyOverwrites,
    follow,
    follow_stream,
    merged_streams,
    text_of,
)


def shown(*texts: str) -> str:
    out: array[int] = array("H")
    cursor = 0
    for text in texts:
        cursor = follow(out, cursor, text).cursor
    return text_of(out)


@pytest.mark.parametrize(
    ("texts", "want"),
    [
        (("Z3.71", "\r1"), "13.71"),
        (("13.71x", "\b,20.83"), "13.71,20.83"),
        (("ro", "w:7\n"), "row:7\n"),
        (("abc\rX", "\n", "d"), "Xbc\nd"),  # a line feed goes to the end, not the cursor
        (("a\n\b\bb",), "a\nb"),  # no backspace across a line's end
        (("abcd\r\bX",), "Xbcd"),
        (("abcdef\rab\bX",), "aXef"),  # a backspace takes the character before the cursor and the one under it
        (("14\u00e9", "\b.26"), "14.26"),  # a whole character, as in JupyterLab's strings, not a byte of it
        (("1\U0001f600\b\b7.99",), "17.99"),  # a UTF-16 code unit at a time: two for a character past the BMP
        (("a\U0001f600\bb",), "a\ud83db"),  # one leaves half of it
    ],
)
def test_messages_of_a_stream_show_what_one_text_of_them_shows(texts, want):
    assert shown(*texts) == want
    assert shown("".join(texts)) == want


def test_a_message_is_read_with_the_line_it_changes_and_no_more():
    first, line = follow_stream(None, "stdout", "row:1\nZow:2")
    assert first == "" and line == StreamLine("stdout", "Zow:2", 5)  # its own text, on lines of its own
    region, line = follow_stream(line, "stdout", "\rr")
    assert region == "row:2" and line.cursor == 1
    # another stream starts an output of its own
    region, other = follow_stream(line, "stderr", "\rr")
    assert region == "r" and other == StreamLine("stderr", "r", 1)
    # on a long line, what a message changes and CONTEXT bytes on either side
    _, long = follow_stream(None, "stdout", "x" * 50_000)
    region, _ = follow_stream(long, "stdout", "\rAB")
    assert region == "AB" + "x" * CONTEXT
    region, _ = follow_stream(long, "stdout", "tail")
    assert region == "x" * CONTEXT + "tail"


def test_a_line_longer_than_the_head_kept_is_followed_from_its_start():
    _, line = follow_stream(None, "stdout", "Z" + "x" * (2 * MAX_LINE))
    assert len(line.head) == MAX_LINE and line.cursor == 2 * MAX_LINE + 1
    region, line = follow_stream(line, "stdout", "\r1")
    assert region.startswith("1xxx") and line.cursor == 1


def test_backspaces_that_would_cost_too_much_are_refused():
    with pytest.raises(TooManyOverwrites, match="backspaces and carriage returns"):
        follow(array("H", b"A" * 2_000_000), 0, "x\b" * 100_000)


def test_consecutive_stream_outputs_of_one_name_are_joined_wherever_a_list_of_outputs_stands():
    """As JupyterLab joins them when it loads a notebook's or an Output widget's outputs: a value cut in two at
    an output's end is whole; another stream or another kind of output keeps them apart."""
    halves = [{"output_type": "stream", "name": "stdout", "text": t} for t in ("ro", "w:7\n", "Zow:8", "\rr\n")]
    state = {"data": {"state": {"outputs": [*halves, {"output_type": "stream", "name": "stderr", "text": "x"}]}}}
    joined = merged_streams(state)["data"]["state"]["outputs"]
    assert joined == [
        {"output_type": "stream", "name": "stdout", "text": "row:7\nZow:8\rr\n"},
        {"output_type": "stream", "name": "stderr", "text": "x"},
    ]
    apart = [halves[0], {"output_type": "display_data", "data": {}}, halves[1]]
    assert merged_streams(apart) is apart
    lines = [{"output_type": "stream", "name": "stdout", "text": ["ro", "w:9\n"]}, halves[1]]
    assert merged_streams(lines) == [{"output_type": "stream", "name": "stdout", "text": "row:9\nw:7\n"}]
    plain = {"name": "stdout", "text": "row:1\n"}
    assert merged_streams(plain) is plain
