"""Property: whatever single change is made to a trail's bytes or lines, verify finds it."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from paitient.rules.records import GENESIS, encode, make_record
from paitient.services.audit.verify import check_trail

NAME = "trail-000001.jsonl"


def chain(n: int) -> list[bytes]:
    recs = [
        make_record(
            seq=0,
            prev=GENESIS,
            actor="system",
            action="audit.file",
            object=NAME,
            details={"file": NAME, "previous_file": ""},
        )
    ]
    for i in range(1, n):
        recs.append(
            make_record(
                seq=i,
                prev=recs[-1]["hash"],
                actor=f"u{i % 3}",
                action="cell.execute",
                details={"code": f"print({i}) # é ✓", "x": i / 7},
            )
        )
    return [encode(r) for r in recs]


LINES = chain(12)
HEAD = {"file": NAME, "seq": 11, "hash": json.loads(LINES[-1])["hash"]}


def check(lines):
    return check_trail([(NAME, lines)], HEAD)


def test_untouched_chain_is_ok():
    assert check(list(LINES)).ok


@given(pos=st.integers(0, sum(map(len, LINES)) - 1), byte=st.integers(0, 255))
@settings(max_examples=300, deadline=None)
def test_any_byte_change_is_found(pos, byte):
    data = bytearray(b"".join(LINES))
    if data[pos] == byte:
        byte = (byte + 1) % 256
    data[pos] = byte
    assert not check(bytes(data).splitlines(keepends=True)).ok


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_any_line_deletion_insertion_or_swap_is_found(data):
    lines = list(LINES)
    kind = data.draw(st.sampled_from(["delete", "duplicate", "swap", "move"]))
    i = data.draw(st.integers(0, len(lines) - 1))
    if kind == "delete":
        del lines[i]
    elif kind == "duplicate":
        lines.insert(data.draw(st.integers(0, len(lines))), lines[i])
    elif kind == "swap":
        j = data.draw(st.integers(0, len(lines) - 1).filter(lambda j: j != i))
        lines[i], lines[j] = lines[j], lines[i]
    else:
        line = lines.pop(i)
        j = data.draw(st.integers(0, len(lines)).filter(lambda j: j != i))
        lines.insert(j, line)
    assert not check(lines).ok
