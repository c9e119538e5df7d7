"""Records, one layout at a time: three values of a row count together only where they belong together."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from paitient.rules.edm import WINDOW, EDMIndex, Scan
from paitient.rules.edm.records import record_cap

ROWS, COLS = 60, 6


@pytest.fixture(scope="module")
def table() -> np.ndarray:
    """60 rows x 6 columns of distinct 5-digit values (no value repeats anywhere)."""
    values = np.random.default_rng(5).permutation(np.arange(10_000, 99_999))[: ROWS * COLS] / 100
    return values.reshape(ROWS, COLS)


@pytest.fixture(scope="module")
def index(table) -> EDMIndex:
    return EDMIndex.build(pa.table({f"c{j}": table[:, j] for j in range(COLS)}), key=bytes(range(32)))


def found(index, text) -> list[int]:
    return Scan(text).rows(index).tolist()


def filler(n: int) -> str:
    """``n`` numbers that are no value of the table (6 digits, beyond its range)."""
    return " ".join(f"{1000 + i}.{i % 97:02d}" for i in range(n))


def test_three_values_on_one_line_reveal_the_row_and_two_do_not(index, table):
    row = table[7]
    assert found(index, f"{row[0]} {row[3]} {row[5]}") == [7]
    assert found(index, f"{row[0]} {row[3]}") == []
    assert found(index, f"{row[0]} {row[0]} {row[0]}") == []  # one column thrice is one column


def test_values_far_apart_in_the_text_do_not_meet(index, table):
    row = table[7]
    gap = "\n" + filler(WINDOW) + "\n"
    assert found(index, f"{row[0]}{gap}{row[3]}{gap}{row[5]}") == []


def test_one_value_per_line_meets_in_a_window(index, table):
    row = table[7]
    many = "\n" + filler(3 * record_cap(COLS)) + "\n"  # more values than a row has, around them
    assert found(index, many + "\n".join(str(v) for v in row) + many) == [7]
    spread = f"{row[0]}\n{filler(WINDOW - 3)}\n{row[1]}\n{row[2]}"
    assert found(index, many + spread + many) == [7]  # first to last within WINDOW tokens
    too_far = f"{row[0]}\n{filler(WINDOW)}\n{row[1]}\n{row[2]}"
    assert found(index, many + too_far + many) == []


def test_a_short_text_is_one_record(index, table):
    row = table[7]
    assert found(index, f"{row[0]}\n{filler(WINDOW)}\n{row[1]}\n{row[2]}") == [7]  # 15 values: one record


def test_values_after_the_same_key_meet(index, table):
    by_column = {f"c{j}": {str(i): table[i, j] for i in (3, 7, 9)} for j in range(COLS)}
    assert found(index, json.dumps(by_column)) == [3, 7, 9]
    pretty = json.dumps(by_column, indent=4)  # one value per line, keys repeated
    assert found(index, pretty) == [3, 7, 9]


def test_lines_starting_with_the_same_label_meet(index, table):
    """A wide frame printed in blocks of columns: each row's label opens one line per block."""
    blocks = []
    for cols in ((0, 1), (2, 3), (4, 5)):
        blocks.append("\n".join(f"{i}  " + "  ".join(str(table[i, j]) for j in cols) for i in (2, 7, 30)))
    assert found(index, "\n\n".join(blocks)) == [2, 7, 30]


def test_values_at_the_same_place_of_lines_meet(index, table):
    """A transposed frame: a line per column, a row's values at the same place from the end."""
    picks = [4, 7, 11, 20]
    lines = [f"c{j}  " + "  ".join(str(table[i, j]) for i in picks) for j in range(COLS)]
    assert found(index, "\n".join(lines)) == picks
    as_lists = {f"c{j}": [table[i, j] for i in picks] for j in range(COLS)}
    assert found(index, repr(as_lists)) == picks


def test_a_json_object_per_row_meets_across_lines(index, table):
    records = [{f"c{j}": table[i, j] for j in range(COLS)} for i in (5, 6)]
    assert found(index, json.dumps(records, indent=2)) == [5, 6]


def test_an_html_row_meets_however_its_cells_are_decorated(index, table):
    cells = "".join(f'<td class="data row0 col{j} level0 highlighted cell">{table[8, j]}</td>' for j in range(COLS))
    assert found(index, f"<table><tr>{cells}</tr><tr><td>1</td></tr></table>") == [8]


def test_a_record_with_more_values_than_a_row_has_counts_for_nothing(index, table):
    row = table[7]
    cap = record_cap(COLS)
    gap = filler(WINDOW)
    crowded = f"{filler(cap)} {row[0]} {gap} {row[3]} {gap} {row[5]} {filler(cap)}"
    assert found(index, crowded.replace(" ", ", ")) == []  # one line, far more values than a row has
    assert found(index, f"{filler(cap - 3)} {row[0]} {row[3]} {row[5]}") == [7]  # as many as a row may


def test_a_printed_column_is_no_row(index, table):
    """Values at one place of many lines that all belong to one column: chance matches there count not."""
    lines = [f"{i}  {table[i, 0]}  {filler(1)}" for i in range(40)]
    # row 50's values of columns 1, 2, 3 stand in the first column's place of three lines far apart
    for at, j in ((5, 1), (20, 2), (35, 3)):
        lines[at] = f"{at}  {table[50, j]}  {filler(1)}"
    assert found(index, "\n".join(lines)) == []
    transposed = "\n".join(f"c{j}  " + "  ".join(str(table[i, j]) for i in range(10)) for j in range(COLS))
    assert found(index, transposed) == list(range(10))  # where the places hold rows, they count
