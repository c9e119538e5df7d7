"""Tokens and number normalisation: what a printed number or word becomes, on both sides alike."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paitient.rules.edm import EDMIndex, Keyed, Scan
from paitient.rules.edm import numbers as nb
from paitient.rules.edm.hashing import word_view
from paitient.rules.edm.tokens import lowered, tokenize

KEY = bytes(range(32))


def words(text: str) -> list[str]:
    t = tokenize(text)
    buf = bytes(t.buf)
    return sorted(buf[s : s + n].decode() for s, n in zip(t.word_start, t.word_len, strict=True))


def numbers(text: str) -> list[tuple[float, int]]:
    t = tokenize(text)
    return [(float(v), int(k)) for v, k in zip(t.value, t.ndigits, strict=True)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("17.99", [(17.99, 4)]),
        ("-0.0001184", [(0.0001184, 4)]),
        ("1.184e-01", [(0.1184, 4)]),
        ("1.5E+03", [(1500.0, 2)]),
        ("1001.0", [(1001.0, 5)]),
        ("174.", [(174.0, 3)]),
        (".5", [(0.5, 1)]),
        ("+3", [(3.0, 1)]),
        ("0.12345678901234567891", [(0.12345678901234568, 20)]),
        ('{"174": 3.25}', [(3.25, 3)]),  # the key is a label, not a value
        ("12:30", [(30.0, 2)]),  # 12 is a label
        ("2019-03-04 v1.2.3 x86 1.2.3 127.0.0.1 1e5e5 3-4 - . e", []),
        ("0 0.0 0.000", []),
        ("[101, 102, 103, 104] 7.25", [(7.25, 3)]),  # a counting sequence is labels
        ("[101.0, 102.0, 103.5]", [(101.0, 4), (102.0, 4), (103.5, 4)]),
        # a decimal comma, where the comma cannot be a thousands group or a list's
        ("17,99;-0,1184;1001,0", [(17.99, 4), (0.1184, 4), (1001.0, 5)]),
        ("0,123 1234,567", [(0.123, 3), (1234.567, 7)]),
        ("1,234", [(1.0, 1), (234.0, 3)]),
        ("12,34,56 12,34.5 1,1984-08-07", [(12.0, 2), (34.0, 2), (56.0, 2), (12.0, 2), (34.5, 3), (1.0, 1)]),
        # a full stop after a number; values joined by a sign
        ("radius 17.99. texture 10.38.\nend 174.", [(17.99, 4), (10.38, 4), (174.0, 3)]),
        ("17.99-10.38+122.8 1.5e-3", [(17.99, 4), (10.38, 4), (122.8, 4), (0.0015, 2)]),
        ("1.5e5-3 1990-2000", []),
        # a number with a point joined to others by '_' or ':', or a key; Fortran's exponent
        ("17.99_10.38:122.8 {17.99: 'mean radius'}", [(17.99, 4), (10.38, 4), (122.8, 4), (17.99, 4)]),
        ("feature_0 x86_64 {174: 1} 17.99mm x17.99", [(1.0, 1)]),
        ("1.799000D+01 1.0379999d1 12D+01", [(17.99, 7), (10.379999, 8)]),
        # what a terminal or another script shows as digits
        ("\x1b[1;32m17.99\x1b[0m \\u001b[31m10.38\\u001b[0m", [(17.99, 4), (10.38, 4)]),
        ("\uff11\uff17\uff0e\uff19\uff19 \u0661\u0660\u066b\u0663\u0668", [(17.99, 4), (10.38, 4)]),
    ],
)
def test_what_counts_as_a_number(text, expected):
    assert numbers(text) == expected


def test_words_are_runs_of_four_or_more_and_not_parts_of_numbers():
    assert words("P-7F3SJGQVFCSMMGDI, 2019-03-04 and 0.1184; 00123456 -123456 Hauptstraße") == [
        "00123456",
        "2019-03-04",
        "Hauptstra",
        "P-7F3SJGQVFCSMMGDI",
    ]
    assert words("2019-03-04T10:00:00.000") == ["2019-03-04", "2019-03-04T10"]


def test_a_date_written_day_first_with_points_is_a_word_where_it_stands_alone():
    expected = ["04.03.2019", "31.12.2020", "admitted", "discharged"]
    assert words("admitted 04.03.2019, discharged 31.12.2020.") == expected
    assert words("(04.03.2019)") == ["04.03.2019"]
    for glued in ("1.04.03.2019", "04.03.2019.5", "a04.03.2019", "04.03.20191", "04.03.2019T10", "-04.03.2019"):
        assert "04.03.2019" not in words(glued), glued
    assert words("4.3.2019 04.03.19 2019.03.04") == []  # other forms are not read as dates


def test_a_date_is_found_by_either_form_and_not_by_its_year():
    import datetime as dt

    dates = [dt.date(1931, 3, 4), dt.date(2019, 3, 5), dt.date(2019, 3, 6), dt.date(2019, 3, 7)]
    index = index_of(pa.array(dates, pa.date32()))
    assert found(index, "1931-03-04") == [0]
    assert found(index, "04.03.1931") == [0]
    assert found(index, "05.03.2019") == [1]
    assert found(index, "1931") == []  # a rare year alone is no date
    assert found(index, "03.04.1931") == []  # month first is another date
    timestamps = pa.array([dt.datetime(1931, 3, 4, 10, 30), dt.datetime(2019, 3, 5, 8, 0)], pa.timestamp("us"))
    assert found(index_of(timestamps), "04.03.1931") == [0]
    as_text = index_of(["04.03.1931", "05.03.2019", "06.03.2019", "07.03.2019"])  # dates kept as text
    assert found(as_text, "1931-03-04") == [0] and found(as_text, "04.03.1931") == [0]


def test_a_date_column_indexes_no_more_entries_for_its_second_form():
    import datetime as dt

    dates = pa.array([dt.date(2019, 3, d) for d in range(1, 29)], pa.date32())
    index = index_of(dates)
    assert index.header["entries"] == 2 * 3 * 28  # two per cell: the ISO form's word, and its epoch number


def index_of(values, **kw) -> EDMIndex:
    return EDMIndex.build(pa.table({"a": values, "b": values, "c": values}), key=KEY, **kw)


def found(index: EDMIndex, printed: str) -> list[int]:
    """Rows found when each of three columns prints ``printed`` for one value (a, b, c on one line)."""
    return list(Scan(f"{printed} {printed} {printed}").rows(index))


@pytest.mark.parametrize(
    ("printed", "rows"),
    [
        ("17.99", [0]),  # as stored
        ("17.990000", [0]),  # padded (to_string)
        ("17.989999771118164", [0]),  # through float32 (a tensor)
        ("1.799e+01", [0]),  # scientific
        ("-17.99", [0]),  # sign ignored
        ("18.0", [0]),  # 17.99 to the 3 digits shown (%.1f)
        ("18.00", []),  # 4 digits shown, and 18.00 is not 17.99
        ("17.98", []),
        ("17.991", []),  # shows more digits, and they differ
        ("0.12345", [1]),
        ("0.1235", [1]),  # rounded half up...
        ("0.1234", [1]),  # ...or down: the stored float lies a hair below the midpoint
        ("0.123", [1]),
        ("0.124", []),
        ("123457", [2]),
        ("123456.7", [2]),
        ("1.23457e5", [2]),
        ("123460", []),  # its last digit, 0, contradicts 123457 (a number rounded to tens is not found)
    ],
)
def test_a_value_matches_a_print_that_agrees_to_the_digits_it_shows(printed, rows):
    index = index_of([17.99, 0.12345, 123456.7, 55.5, 66.6, 77.7])
    assert found(index, printed) == rows


def test_fewer_than_three_digits_never_match():
    index = index_of([42.0, 7.5, 0.5, 3.0])
    for printed in ("42", "42.", "7.5", "0.5", "3"):
        assert found(index, printed) == []
    assert found(index, "42.0") == [0]  # three digits printed


def test_natural_precision_is_strict_for_stored_values_and_sees_float32_in_prints():
    x = np.array([17.99, float(np.float32(17.99)), 0.1184, 1 / 3, 123000.0, 1.669999965700896])
    lead = nb.leading_exponent(x)
    assert list(nb.natural_precision(x, lead)) == [4, 6, 4, 6, 3, 6]
    assert list(nb.natural_precision(x, lead, nb.PRINTED_NOISE)) == [4, 4, 4, 6, 3, 3]


def test_values_that_went_through_float32_are_found_by_both_their_prints():
    stored = [float(np.float32(v)) for v in (17.99, 0.1184, 1001.0, 55.5, 66.6, 77.7)]
    index = index_of(stored)
    assert found(index, "17.99") == [0] and found(index, "17.989999771118164") == [0]
    assert found(index, "0.1184") == [1] and found(index, "0.11840000003576279") == [1]
    assert found(index, "17.990000") == [0]


def test_rounding_ties_give_both_neighbours():
    x = np.array([0.1235, 0.12351, 2.5e-8])
    m, e, tie, alt, alt_e = nb.round_at(x, 3, nb.leading_exponent(x))
    assert list(tie) == [True, False, False]
    assert sorted([int(m[0]), int(alt[0])]) == [123, 124] and int(e[0]) == -3
    assert int(m[1]) == 124 and int(m[2]) == 250 and int(e[2]) == -10


def test_leading_exponent_at_powers_of_ten():
    x = np.array([1.0, 9.999999999999999, 10.0, 1e-5, 99.99, 100.0, 1e300, 5e-324, 0.1, 0.09999999999999999])
    assert list(nb.leading_exponent(x)) == [0, 0, 1, -5, 1, 2, 300, -324, -1, -2]


def test_a_fingerprint_does_not_depend_on_what_else_is_hashed_with_it():
    """Index and text hash words in batches of their own: a word must hash alike in any batch."""
    keyed = Keyed(KEY)
    t = tokenize("abcd 2019-03-04 P-7F3SJGQVFCSMMGDI 12345678 " + "x" * 40)
    view = word_view(lowered(t.buf))
    together = keyed.words(view, t.word_start, t.word_len)
    alone = [keyed.words(view, t.word_start[i : i + 1], t.word_len[i : i + 1])[0] for i in range(len(together))]
    assert list(together) == alone and len(set(alone)) == len(alone) == 5


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=300),
        st.text(alphabet=st.sampled_from(list("0123456789.,-+eE :\"'{}[]\n\\<>/trP_abcü ")), max_size=300),
    )
)
def test_any_text_gives_valid_rows_and_never_fails(text):
    index = index_of([17.99, 0.12345, 123456.7, 55.5, 66.6, 77.7])
    rows = Scan(text).rows(index)
    assert rows.dtype == np.int64 and list(rows) == sorted(set(rows.tolist()))
    assert all(0 <= r < 6 for r in rows)
    t = tokenize(text)
    assert np.all(t.value > 0) and np.all(np.isfinite(t.value))


def test_empty_and_odd_texts():
    index = index_of([17.99, 0.12345, 123456.7, 55.5, 66.6, 77.7])
    for text in ("", b"", "\n", b"\xff\xfe\x00", "ü" * 50, "." * 100, "-" * 100, "e" * 100, "9" * 200):
        assert list(Scan(text).rows(index)) == []
    assert found(index, "17.99") == [0]  # the helper prints it in three columns: a, b and c


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        # JupyterLab drops "\x1b[" up to the first character from "@" to "~" on the line, after escaping the
        # text for HTML (so "<" there ends at the "l" of "&lt;")
        (b"13\x1b[ 0m.71", b"13.71"),
        (b"13\x1b[?!#m.71", b"13.71"),
        (b"\x1b[<13.71", b"t;13.71"),
        (b"a\x1b[12\nB", b"a\x1b[12\nB"),  # not across a line
        # a backspace removes the character before it (and the one under the cursor); not a line's end
        (b"13.71x\x08,", b"13.71,"),
        (b"a\n\x08b", b"a\nb"),
        # a carriage return goes back to the line's start; what follows writes over the line
        (b"Z3.71\r1", b"13.71"),
        (b"ZZZZ\rab\ncd", b"abZZ\ncd"),
        (b"a,b\r\n1,2\r\n", b"a,b\n1,2\n"),
        # the same as JSON writes them (a notebook's outputs)
        (b'"13.71x\\b,20.83x\\u0008\\nZ3.71\\r1\\n"', b'\n"\n13.71,20.83\n13.71\n\n"\n'),
        (b'["Z3.71\\r1\\n", "2"]', b'[\n"\n13.71\n\n"\n, \n"\n2\n"\n]'),  # each string from its start
        (b'"13\\u001b[ 0m.71"', b'\n"\n13.71\n"\n'),
        # an escaped quote is no string's end; an escaped backslash before "b" is read as a backspace too
        # (JupyterLab shows "a\\b": this view reads less of it, the text's own view all of it)
        (b'"a\\\\b \\"x\\r"', b'\n"\na "x\n"\n'),
    ],
)
def test_the_text_is_read_as_jupyterlab_shows_it(text, shown):
    from paitient.rules.edm.tokens import as_lab_shows, normalised

    assert as_lab_shows(text) == shown
    # the row detection reads both the text and, where it shows otherwise, JupyterLab's view of it
    assert normalised(text).replace(b"\r\n", b"\n").endswith(shown)


def test_the_values_of_lab_view_are_numbers_of_their_own():
    assert numbers("13.71x\b,20.83x\b") == [(13.71, 4), (20.83, 4)]
    assert (13.71, 4) in numbers("Z3.71\r1\n\x1b[ 0m") and (13.71, 4) not in numbers("Z3.71 1")


def test_overwriting_beyond_the_bound_is_refused_and_a_progress_bar_is_read_in_time():
    """A text whose backspaces would move megabytes each is refused (the egress service withholds a text it
    cannot read) rather than followed at quadratic cost; a progress bar's thousand updates are read at once."""
    import time

    from paitient.rules.edm.tokens import as_lab_shows
    from paitient.rules.shown import TooManyOverwrites

    with pytest.raises(TooManyOverwrites, match="backspaces and carriage returns"):
        as_lab_shows(b"A" * 2_000_000 + b"\r" + b"x\x08" * 100_000)
    bar = b"".join(b"\r%3d%%|" % (i // 10) + b"#" * (i // 20) + b"| %d/1000" % i for i in range(1001))
    started = time.perf_counter()
    assert as_lab_shows(bar).endswith(b"| 1000/1000")
    assert time.perf_counter() - started < 1.0
