"""The compiled counting within records finds the rows the whole-array reference finds, layout by layout."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paitient.rules.edm import EDMIndex, Scan, compiled_records, match
from paitient.rules.edm.match import sift
from paitient.rules.edm.records import LAYOUTS, MIN_ROW_COLUMNS, WINDOW, Layout, rows_in_windows, rows_in_windows_arrays
from paitient.rules.edm.tokens import tokenize

ROWS, COLS = 12, 5
SEPARATORS = [" ", ", ", "\n", "\n\n", "\\n", "{", "}", "[", "]", "</tr>", "<tr><td>", '"7": ', "7: ", "x: ", '"k": ']


@pytest.fixture(scope="module")
def table() -> dict[str, list[object]]:
    """Few rows, so that chance meetings of three columns are common: distinct 4-digit values, a pseudonym, a
    label column of two values (frequent: no entries), and a column whose values repeat across rows."""
    rng = np.random.default_rng(3)
    values = rng.permutation(np.arange(1000, 9999))[: ROWS * 3].reshape(ROWS, 3) / 100
    return {
        "patient": [f"P-{i:03d}XK7Q" for i in range(ROWS)],
        "a": values[:, 0].tolist(),
        "b": values[:, 1].tolist(),
        "c": values[:, 2].tolist(),
        "label": ["left", "right"] * (ROWS // 2),
        "shared": [12.34, 56.78, 90.12] * (ROWS // 3),
    }


@pytest.fixture(scope="module")
def index(table) -> EDMIndex:
    return EDMIndex.build(pa.table(table), key=bytes(range(32)), primary_columns=["patient"])


def pieces(table: dict[str, list[object]]) -> st.SearchStrategy[str]:
    """A value of any cell (printed as it is, or with more digits), a separator, or a word."""
    cells = [str(v) for col in table.values() for v in col]
    padded = [f"{v:.6f}" for col in ("a", "b", "c") for v in table[col]]
    words = ["mean", "std", "Epoch", "row0", "2019-03-04", "12", "0.5"]
    return st.sampled_from(cells) | st.sampled_from(padded) | st.sampled_from(SEPARATORS) | st.sampled_from(words)


def assert_layouts_agree(scan: Scan, index: EDMIndex) -> int:
    """Every layout's rows from the compiled counting and from the reference, on the scan's own hits; the
    layouts that had hits to count."""
    q = scan.queries(index.keyed)
    hits = index.lookup(q.fp)
    if not len(hits.query):
        return 0
    _, candidates, tok, row, col = sift(hits, q, index.rows)
    counted = 0
    for name in LAYOUTS:
        for keep in (np.ones(len(row), bool), candidates[row]):
            args = (name, tok[keep], row[keep], col[keep], index.rows, len(index.columns), (tok, col))
            fast, ref = scan.layout.rows(*args), Layout(scan.tokens).rows_arrays(*args)
            assert fast.dtype == np.int64 and np.array_equal(fast, ref), name
            counted += len(ref) > 0
    return counted


def reference_rows(scan_text: str, index: EDMIndex, monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """The rows of the whole-array reference, and (checked on the way) of the compiled layouts one at a time:
    :meth:`Scan.rows` counts all layouts in one compiled call on texts of an output's size."""
    ref = Scan(scan_text).rows_reference(index)
    with monkeypatch.context() as m:
        m.setattr(match, "FUSED_TOKENS", -1)
        assert np.array_equal(Scan(scan_text).rows(index), ref)
    return ref


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_text_of_a_tables_values_reveals_the_references_rows(table, index, data):
    parts = data.draw(st.lists(pieces(table), max_size=120))
    gaps = data.draw(st.lists(st.sampled_from(SEPARATORS), min_size=1, max_size=4))
    text = "".join(p + gaps[i % len(gaps)] for i, p in enumerate(parts))
    assert_layouts_agree(Scan(text), index)
    with pytest.MonkeyPatch.context() as m:
        fast = Scan(text).rows(index)
        assert np.array_equal(fast, reference_rows(text, index, m))


def printed(table: dict[str, list[object]]) -> list[str]:
    """Texts that reveal rows in each layout, and texts of columns, and texts with too many values."""
    cols = ("a", "b", "c")
    rows = [[table[c][i] for c in cols] for i in range(ROWS)]
    filler = " ".join(f"{2000 + i}.5" for i in range(40))
    return [
        "",
        "\n".join(" ".join(str(v) for v in r) for r in rows),
        "\n".join(f'{{"a": {r[0]}, "b": {r[1]}, "c": {r[2]}}}' for r in rows),
        "\n".join("\n".join(str(v) for v in r) for r in rows),
        "\n".join(str(v) for v in table["a"]) + "\n\n" + "\n".join(str(v) for v in table["b"]),
        "<table>" + "".join(f"<tr><td>{r[0]}</td>\n<td>{r[1]}</td>\n<td>{r[2]}</td></tr>" for r in rows),
        "\n".join(f"{c}: " + " ".join(str(v) for v in table[c]) for c in cols),
        "\n".join(f"{i}: {r[0]} {filler} {r[1]} {r[2]}" for i, r in enumerate(rows)),
        "\n".join(f"{c} " + " ".join(str(v) for v in table[c]) for c in cols) + "\n" + filler,
        "[" + ", ".join(f"[{r[0]}, {r[1]}, {r[2]}]" for r in rows) + "]",
        " ".join(table["patient"]) + " " + " ".join(str(v) for v in table["shared"]),
        "\n".join(f"{table['label'][i]} {table['shared'][i]} {rows[i][0]}" for i in range(ROWS)),
    ]


def test_printed_tables_reveal_the_references_rows(table, index, monkeypatch):
    counted = 0
    revealed = []
    for text in printed(table):
        counted += assert_layouts_agree(Scan(text), index)
        rows = Scan(text).rows(index)
        assert np.array_equal(rows, reference_rows(text, index, monkeypatch))
        revealed.append(len(rows))
    assert counted >= 6  # the layouts found rows to count in the texts, not only nothing
    assert revealed[1] == ROWS and revealed[0] == 0  # a printed table reveals all its rows; nothing, none


@settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=0, max_value=2**32),
    st.integers(min_value=0, max_value=400),
    st.integers(min_value=1, max_value=8),
    st.integers(min_value=1, max_value=6),
    st.sampled_from(["words", "numbers", "mixed"]),
)
def test_any_hits_in_any_layout_reveal_the_references_rows(seed, n, nrows, ncols, kind):
    """Hits drawn at random over the tokens of a text of many short lines, brackets and keys: records with
    more numbers than the cap, column-like records, rows of 1 to 4 columns, repeated hits."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(int(rng.integers(1, 40))):
        head = rng.choice(["", f"k{i % 3}: ", '"7": ', "{", "[", "<tr>"])
        cells = []
        for _ in range(int(rng.integers(0, 9))):
            w = rng.random()
            if kind == "words" or (kind == "mixed" and w < 0.3):
                cells.append(f"W{rng.integers(0, 99):02d}-X{rng.integers(0, 9)}")
            else:
                cells.append(f"{rng.integers(100, 999)}.{rng.integers(1, 9)}")
        tail = rng.choice(["", "}", "]", "</tr>", "\\n"])
        lines.append(head + " ".join(cells) + tail)
    text = "\n".join(lines) if rng.random() < 0.7 else "\n\n".join(lines)
    tokens = tokenize(text)
    total = len(tokens.word_start) + len(tokens.num_start)
    if not total:
        return
    tok = rng.integers(0, total, n).astype(np.int64)
    row = rng.integers(0, nrows, n).astype(np.int64)
    col = rng.integers(0, ncols, n).astype(np.int64)
    extra = rng.integers(0, total, int(rng.integers(0, 60))).astype(np.int64)
    found = (np.concatenate((tok, extra)), np.concatenate((col, rng.integers(0, ncols, len(extra)))))
    for name in LAYOUTS:
        args = (name, tok, row, col, nrows, ncols, found)
        fast, ref = Layout(tokens).rows(*args), Layout(tokens).rows_arrays(*args)
        assert np.array_equal(fast, ref), name


def test_a_row_counts_once_whatever_the_number_of_records_that_show_it():
    rec = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2], dtype=np.int64)
    row = np.array([5, 5, 5, 5, 5, 5, 3, 3, 3, 7], dtype=np.int64)
    col = np.array([0, 1, 2, 0, 1, 2, 0, 0, 1, 2], dtype=np.int64)
    tok = np.arange(10, dtype=np.int64)
    at, any_rows = compiled_records.kept(rec, 3, tok, row, col, 8, 100, 0, False, MIN_ROW_COLUMNS)
    assert any_rows and np.array_equal(at, np.arange(10))
    none = np.zeros(3, dtype=bool)
    rows = compiled_records.revealed(rec, 3, row, col, at, (rec, tok, col), none, 8, 4, MIN_ROW_COLUMNS)
    assert rows.tolist() == [5]  # row 3 has two columns in record 2, row 7 one
    big = np.array([True, True, False])
    assert compiled_records.revealed(rec, 3, row, col, at, (rec, tok, col), big, 8, 4, MIN_ROW_COLUMNS).size == 0


def test_a_pooled_record_with_more_distinct_numbers_hit_than_the_cap_keeps_none_of_its_hits():
    rec = np.array([0, 0, 0, 0, 1, 1, 1], dtype=np.int64)
    tok = np.array([10, 11, 12, 12, 10, 11, 5], dtype=np.int64)  # record 0: 3 distinct numbers, record 1: 2
    row = np.array([1, 1, 1, 1, 2, 2, 2], dtype=np.int64)
    col = np.array([0, 1, 2, 2, 0, 1, 2], dtype=np.int64)
    at, _ = compiled_records.kept(rec, 2, tok, row, col, 3, 2, 10, True, MIN_ROW_COLUMNS)
    assert at.tolist() == [4, 5, 6]
    at, _ = compiled_records.kept(rec, 2, tok, row, col, 3, 3, 10, True, MIN_ROW_COLUMNS)
    assert at.tolist() == list(range(7))
    at, _ = compiled_records.kept(rec, 2, tok, row, col, 3, 2, 13, True, MIN_ROW_COLUMNS)  # all words
    assert at.tolist() == list(range(7))


def test_scanning_after_warm_up_reveals_the_references_rows(table, index, monkeypatch):
    compiled_records.warm_up()
    text = printed(table)[1]
    assert np.array_equal(Scan(text).rows(index), reference_rows(text, index, monkeypatch))


TEXT_BYTES = st.sampled_from(list(b"0123456789-_.+eE aZz\n\r{}[]<>/tTrR\\n:\"',") + [0, 127, 200, 255])
TAGS = st.sampled_from(["</tr>", "</TR>", "</tR>", "</td>", "<tr>", "</t", "\\n", "\\", "x", " ", "\n"])
KEYED = st.sampled_from(['"7": ', "7: ", "'k': ", "x:", "\n", "\n\n", "</tr>", "12.5 ", "P-7F3SJGQ ", "[", "]", " "])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(TEXT_BYTES, max_size=400).map(bytes)
    | st.binary(max_size=300)
    | st.text(max_size=200)
    | st.lists(KEYED, max_size=120).map("".join)
    | st.lists(TAGS, max_size=60).map("".join)
)
def test_the_compiled_passes_over_the_bytes_find_what_the_references_find(text):
    """Separators, runs of value bytes and value-like words, on any text: markup, JSON, dates, pseudonyms,
    bytes outside ASCII."""
    layout = Layout(tokenize(text))
    for values in ((10,), (92,), (60,), (10, 13, 125, 93), (123, 125, 91, 93), (10, 13, 91, 93)):
        fast, ref = layout._bytes(*values), layout._bytes_arrays(*values)
        assert fast.dtype == np.int64 and np.array_equal(fast, ref)
    assert np.array_equal(layout.row_ends, layout.row_ends_arrays())
    assert np.array_equal(layout.newlines, layout._bytes_arrays(10))
    for fast, ref in zip(layout.sorted_starts, layout.sorted_starts_arrays(), strict=True):
        assert fast.dtype == np.int64 and np.array_equal(fast, ref)
    shuffled = Layout(tokenize(text))  # offsets in no order: sorted all the same
    shuffled.start = shuffled.start[::-1].copy()
    shuffled._cache["vl"] = layout.value_like[::-1].copy()
    for fast, ref in zip(shuffled.sorted_starts, shuffled.sorted_starts_arrays(), strict=True):
        assert np.array_equal(fast, ref)
    for name in ("line", "brace", "html", "position"):
        fast, ref = layout._separators(name), layout.separators_arrays(name)
        assert fast.dtype == np.int64 and np.array_equal(fast, ref)
    for fast, ref in zip(layout._runs(), layout.runs_arrays(), strict=True):
        assert np.array_equal(fast, ref)
    assert np.array_equal(layout.value_like, layout.value_like_arrays())
    tok = np.arange(len(layout.start), dtype=np.int64)
    at = layout.start
    assert np.array_equal(layout._key(at), layout.key_arrays(at))
    assert np.array_equal(layout._position(at), layout.position_arrays(at))
    for name in ("line", "brace", "html"):
        if len(layout._separators(name)):
            for cap in (0, 2, 10, 100):
                assert np.array_equal(layout._segments(name, tok, cap), layout.segments_arrays(name, tok, cap))


def test_value_like_words_are_judged_on_their_first_and_last_eight_bytes():
    words = ["2019-03-04", "P-7F3SJGQVFCSMMGDI", "Post-menopausal", "row0", "1234", "abc1-", "ab12cd34",
             "abcdefgh1-xyz", "abcdefghijklmnopqrstu-vwxyz1", "abcdefgh12345678abcdefgh"]  # fmt: skip
    layout = Layout(tokenize(" ".join(words) + " 17.99"))
    assert len(layout.tokens.word_start) == len(words)
    got = dict(zip([w.lower() for w in words], layout.value_like.tolist(), strict=False))
    assert layout.value_like[-1]  # a number
    assert got["2019-03-04"] and got["p-7f3sjgqvfcsmmgdi"] and got["1234"] and got["abc1-"] and got["ab12cd34"]
    assert not got["post-menopausal"] and not got["row0"]
    assert got["abcdefgh1-xyz"]  # the digit and the dash in its last 8 bytes
    assert got["abcdefghijklmnopqrstu-vwxyz1"]  # both in its last 8 bytes
    assert not got["abcdefgh12345678abcdefgh"]  # digits only in the middle, which is not read
    assert np.array_equal(layout.value_like, layout.value_like_arrays())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=-1, max_value=2**63 - 1) | st.integers(min_value=-1, max_value=40), max_size=300))
def test_records_are_numbered_as_numpy_numbers_the_distinct_ids(values):
    """Key hashes (up to 63 bits), small segment numbers, repeats, and no record (-1)."""
    rec = np.array(values, dtype=np.int64)
    ids, numbers = compiled_records.dense(rec)
    uniq, inverse = np.unique(rec[rec >= 0], return_inverse=True)
    assert np.array_equal(ids, uniq)
    assert np.array_equal(numbers[rec >= 0], inverse) and (numbers[rec < 0] == -1).all()


@settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=0, max_value=2**32),
    st.integers(min_value=0, max_value=300),
    st.sampled_from([4, 50, 2**23 + 5, 2**27]),
    st.sampled_from([30, 500, 2**30 + 9]),
    st.integers(min_value=1, max_value=6),
    st.integers(min_value=1, max_value=30),
)
def test_windows_reveal_the_references_rows(seed, n, nrows, places, ncols, window):
    """Hits of few rows and columns at places close together, repeated hits, rows and places beyond what a
    packed key holds (renumbered first)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, places, max(n // 20, 1))
    ordinal = np.minimum(base[rng.integers(0, len(base), n)] + rng.integers(0, 15, n), places - 1)
    row = rng.choice(rng.integers(0, nrows, 5), n).astype(np.int64)
    col = rng.integers(0, ncols, n).astype(np.int64)
    fast, ref = rows_in_windows(ordinal, row, col, window), rows_in_windows_arrays(ordinal, row, col, window)
    assert fast.dtype == np.int64 and np.array_equal(fast, ref)


def test_a_window_holds_three_columns_of_a_row_only_within_its_width():
    ordinal = np.array([0, 5, 11, 40, 41, 60], dtype=np.int64)
    row = np.array([3, 3, 3, 8, 8, 8], dtype=np.int64)
    col = np.array([0, 1, 2, 0, 1, 2], dtype=np.int64)
    assert rows_in_windows(ordinal, row, col, WINDOW).tolist() == [3]  # 0..11: 12 tokens; 40..60: 21
    assert rows_in_windows(ordinal, row, col, 21).tolist() == [3, 8]


@settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=0, max_value=2**32),
    st.integers(min_value=0, max_value=400),
    st.integers(min_value=1, max_value=8),
    st.integers(min_value=1, max_value=6),
    st.sampled_from(["words", "numbers", "mixed"]),
)
def test_all_layouts_in_one_call_reveal_the_rows_of_the_layouts_one_at_a_time(seed, n, nrows, ncols, kind):
    """Random hits over a text of short lines, brackets and keys (as above), some rows revealed already and
    some not candidates: the one compiled call over every layout reveals what the reference's layouts, one
    after the other on what the ones before left, reveal."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(int(rng.integers(1, 40))):
        head = rng.choice(["", f"k{i % 3}: ", '"7": ', "{", "[", "<tr>", "\n"])
        cells = []
        for _ in range(int(rng.integers(0, 9))):
            if kind == "words" or (kind == "mixed" and rng.random() < 0.3):
                cells.append(f"W{rng.integers(0, 99):02d}-X{rng.integers(0, 9)}")
            else:
                cells.append(f"{rng.integers(100, 999)}.{rng.integers(1, 9)}")
        lines.append(head + " ".join(cells) + rng.choice(["", "}", "]", "</tr>", "\\n"]))
    text = "\n".join(lines) if rng.random() < 0.7 else "\n\n".join(lines)
    tokens = tokenize(text)
    total = len(tokens.word_start) + len(tokens.num_start)
    if not total:
        return
    tok = rng.integers(0, total, n).astype(np.int64)
    row = rng.integers(0, nrows, n).astype(np.int64)
    col = rng.integers(0, ncols, n).astype(np.int64)
    revealed = rng.random(nrows) < 0.2
    candidates = rng.random(nrows) < 0.9
    scan = Scan(text)

    class Index:  # what rows_by_layout reads of an index
        rows = nrows
        columns = list(range(ncols))

    ref = scan.rows_by_layout(Index(), revealed.copy(), candidates, tok, row, col, reference=True)  # type: ignore[arg-type]
    got = compiled_records.all_layouts(
        scan.layout.all_records,
        (tok, row, col),
        revealed.copy(),
        candidates,
        nrows,
        2 * ncols + 8,
        len(tokens.word_start),
        WINDOW,
        4,
        MIN_ROW_COLUMNS,
    )
    assert got.dtype == np.int64 and np.array_equal(got, ref)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=3000), max_size=200), st.integers(min_value=0, max_value=200))
def test_token_ordinals_are_their_ranks_among_the_distinct_offsets(offsets, words):
    start = np.array(offsets, dtype=np.int64)
    words = min(words, len(start))
    ranks = np.searchsorted(np.unique(start), start)
    assert np.array_equal(compiled_records.ordinals(start, words), ranks)  # any order
    halves = np.concatenate((np.sort(start[:words]), np.sort(start[words:])))  # as the tokenizer gives them
    assert np.array_equal(compiled_records.ordinals(halves, words), np.searchsorted(np.unique(halves), halves))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=-1, max_value=2**63 - 1) | st.integers(min_value=-1, max_value=6), max_size=300))
def test_a_pooled_layouts_records_group_the_tokens_that_share_an_id(ids):
    ids_a = np.array(ids, dtype=np.int64)
    vl = np.arange(len(ids_a)) % 3 != 0
    rid = np.empty(len(ids_a), dtype=np.int64)
    size = np.empty(len(ids_a), dtype=np.int64)
    records = compiled_records.pooled_row(ids_a, vl, 1 << 62, rid, size)
    distinct = np.unique(ids_a[ids_a >= 0])
    assert records == len(distinct)
    assert np.array_equal(rid < 0, ids_a < 0)
    for x in distinct:  # the tokens of one id share one number, no other id has it; sizes count value-like ones
        mine = ids_a == x
        assert len(set(rid[mine].tolist())) == 1 and not np.any(rid[~mine] == rid[mine][0])
        n = int(np.count_nonzero(vl & mine))
        assert set(size[mine].tolist()) == {n if n else 1 << 62}
