"""Records: the groups of tokens within which three values of one row count as that row revealed.

A dataset row can leave in many layouts, so a token belongs to several records at once, one per
layout, and a row counts when any one record holds values of three of its columns:

- ``line``: a line; lines also end at a literal ``\\n`` (inside JSON strings, notebook files), at
  ``}`` and ``]`` (one JSON or Python record of many on one line) and at ``</tr>``;
- ``key``: the tokens that follow the same key, ``"7": v`` or ``7: v`` (``to_json()``'s default
  orient, ``to_dict()``), or that stand on lines starting with the same label (a wide frame printed
  in column blocks repeats each row's index label once per block);
- ``position``: the tokens at the same place, counted from the end, of the lines or ``[...]`` lists
  of one paragraph (a transposed frame, a dict of lists);
- ``brace``: what lies between two of ``{ } [ ]`` (pretty-printed JSON, one object per row);
- ``html``: what lies between two ``</tr>``;
- ``window``: any :data:`WINDOW` consecutive tokens, across lines (one value per line, a Series of
  one row, HTML with a cell per line).

A record counts only while it holds at most ``2 * columns + 8`` value-like tokens (numbers, and words
with a digit and a '-' or with 4 digits), about what one row of the dataset can produce: a list of a
thousand integers holds "three values" of many rows by chance, and the pooling layouts (key,
position) would otherwise gather a long log whose lines all start with ``Epoch``. A dump on one line
without separators is still caught by the windows, which have no cap. And a record counts only while
it looks like a row, not a column: when more than half (and at least 4) of the dataset values found
in it belong to one column (a printed column of a frame is a ``position`` record; a column's object
in ``to_json(indent=2)`` a ``brace`` one), chance matches among its values say nothing about a row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from paitient.rules.edm import compiled_records
from paitient.rules.edm.hashing import MAX_WORD, word_hash, word_view
from paitient.rules.edm.tokens import Tokens, runs

WINDOW = 12
"""Tokens in a sliding window."""
MIN_ROW_COLUMNS = 3
"""Values of this many different columns of one row, in one record, reveal the row."""
LAYOUTS = ("line", "key", "position", "brace", "html", "window")
_SEGMENTS = ("line", "brace", "html")
_KEY_LANES = (np.uint64(0x243F6A8885A308D3), np.uint64(0x13198A2E03707344))
_COL_BITS = np.uint64(10)
_T = TypeVar("_T")
_NEVER = 1 << 62  # the value-like tokens of a record that no cap lets count
COLUMN_LIKE_MIN = 4  # a record is a printed column when one column has this many of its values, and most


def _run_byte(b: np.ndarray) -> np.ndarray:
    """Whether each byte (uint8) is one of [A-Za-z0-9_.+-], the bytes of printed values and labels."""
    low = b | np.uint8(32)
    rchar: np.ndarray = ((b - np.uint8(48)) < 10) | ((low - np.uint8(97)) < 26)
    for v in (45, 95, 46, 43):
        rchar |= b == v
    return rchar


_RUN_BYTES = _run_byte(np.arange(256, dtype=np.uint8))
_BYTE_TABLES: dict[tuple[int, ...], np.ndarray] = {}


def _byte_table(values: tuple[int, ...]) -> np.ndarray:
    """256 bools, set at ``values``."""
    table = _BYTE_TABLES.get(values)
    if table is None:
        table = _BYTE_TABLES[values] = np.isin(np.arange(256), values)
    return table


def record_cap(columns: int) -> int:
    return 2 * columns + 8


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """``np.unique`` by sorting (faster here than numpy's hash-based unique for integer arrays)."""
    a = np.sort(a)
    if len(a) < 2:
        return a
    keep = np.empty(len(a), dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def _runs_of(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values of a sorted array and how often each occurs."""
    if not len(a):
        return a, np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate(([True], a[1:] != a[:-1])))
    return a[starts], np.diff(np.concatenate((starts, [len(a)])))


def _number_in(ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The place of each of ``values`` in the sorted distinct ``ids``, -1 where it is none of them."""
    if not len(ids):
        return np.full(len(values), -1, dtype=np.int64)
    at = np.minimum(np.searchsorted(ids, values), len(ids) - 1)
    result: np.ndarray = np.where(ids[at] == values, at, -1)
    return result


def _densify(ids: np.ndarray) -> np.ndarray:
    """Ids renumbered 0..k-1 in their order."""
    return np.searchsorted(sorted_unique(ids), ids)


class Layout:
    """Where the tokens of one text stand, computed piece by piece as the layouts ask for it."""

    def __init__(self, tokens: Tokens):
        self.tokens = tokens
        self.buf = tokens.buf
        self.start = np.concatenate((tokens.word_start, tokens.num_start)).astype(np.int64)
        self._cache: dict[str, Any] = {}

    def _cached(self, name: str, fn: Callable[[], _T]) -> _T:
        if name not in self._cache:
            self._cache[name] = fn()
        got: _T = self._cache[name]
        return got

    def _bytes(self, *values: int) -> np.ndarray:
        """Ascending offsets of the bytes ``values`` in the text (one compiled pass)."""
        return compiled_records.positions(self.buf, _byte_table(values))

    def _bytes_arrays(self, *values: int) -> np.ndarray:
        """:meth:`_bytes` in numpy, the reference."""
        b = self.buf
        mask = b == values[0]
        for v in values[1:]:
            mask |= b == v
        return np.flatnonzero(mask)

    @property
    def newlines(self) -> np.ndarray:
        return self._all_separators()[3]

    def literal_newlines_arrays(self) -> np.ndarray:
        """Offsets of a backslash followed by ``n`` (numpy; the reference's part of the separators)."""
        bs = self._bytes_arrays(92)
        result: np.ndarray = bs[self.buf[bs + 1] == 110]
        return result

    @property
    def row_ends(self) -> np.ndarray:
        """Offsets of ``</tr>`` (any case): the line layout's separators at a ``<``, the only ones there."""

        def find() -> np.ndarray:
            seps = self._separators("line")
            result: np.ndarray = seps[self.buf[seps] == 60]
            return result

        return self._cached("tr", find)

    def row_ends_arrays(self) -> np.ndarray:
        """:attr:`row_ends` in numpy, the reference."""
        b = self.buf
        lt = self._bytes_arrays(60)
        result: np.ndarray = lt[
            (b[lt + 1] == 47) & ((b[lt + 2] | 32) == 116) & ((b[lt + 3] | 32) == 114) & (b[lt + 4] == 62)
        ]
        return result

    @property
    def value_like(self) -> np.ndarray:
        """Numbers, and words that look like values: with a digit and a '-' (dates, pseudonyms) or with
        4 digits (identifiers), judged on their first and last 8 bytes; not markup such as ``row0``. One
        compiled pass over the words; :meth:`value_like_arrays` is the reference."""

        def find() -> np.ndarray:
            t = self.tokens
            return compiled_records.value_like(t.buf, t.word_start, t.word_len, len(t.num_start))

        return self._cached("vl", find)

    def value_like_arrays(self) -> np.ndarray:
        """:attr:`value_like` in numpy, the reference."""
        t = self.tokens
        ln = t.word_len
        first = t.view[t.word_start].view(np.uint8).reshape(-1, 8)
        last = t.view[t.word_start + ln - 8].view(np.uint8).reshape(-1, 8)
        cols = np.arange(8)
        in_first = cols < np.minimum(ln, 8)[:, None]
        in_last = (cols >= (8 - ln)[:, None]) & (cols >= (16 - ln)[:, None])  # bytes the first 8 missed
        digits = (((first - np.uint8(48)) < 10) & in_first).sum(axis=1)
        digits += (((last - np.uint8(48)) < 10) & in_last).sum(axis=1)
        dash = ((first == 45) & in_first).any(axis=1) | ((last == 45) & in_last).any(axis=1)
        word = ((digits > 0) & dash) | (digits >= 4)
        return np.concatenate((word, np.ones(len(t.num_start), dtype=bool)))

    @property
    def sorted_starts(self) -> tuple[np.ndarray, np.ndarray]:
        """Distinct token offsets, and the offsets of value-like tokens, ascending."""
        return self._cached(
            "ss", lambda: compiled_records.merged_starts(self.start, len(self.tokens.word_start), self.value_like)
        )

    def sorted_starts_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """:attr:`sorted_starts` in numpy, the reference."""
        return sorted_unique(self.start), np.sort(self.start[self.value_like])

    def ordinal(self, tok: np.ndarray) -> np.ndarray:
        """Rank of each token's offset among all offsets (tokens at one offset share a rank)."""
        result: np.ndarray = np.searchsorted(self.sorted_starts[0], self.start[tok])
        return result

    def _runs(self) -> tuple[np.ndarray, np.ndarray]:
        """Runs of [A-Za-z0-9_.+-]: the printed values and labels."""

        return self._cached("runs", lambda: compiled_records.class_runs(self.buf, _RUN_BYTES))

    def runs_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_runs` in numpy, the reference."""
        return runs(_run_byte(self.buf))

    def _separators(self, name: str) -> np.ndarray:
        """Where the records of a segment layout end, or (``position``) its lines and lists: one compiled
        pass finds those of every layout (:func:`paitient.rules.edm.compiled_records.all_separators`);
        :meth:`separators_arrays` is the reference."""

        if name == "html":
            return self.row_ends
        line, brace, place, _ = self._all_separators()
        return {"line": line, "brace": brace, "position": place}[name]

    def _all_separators(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The line, brace and position layouts' separators and the newlines, in one compiled pass."""
        return self._cached("seps", lambda: compiled_records.all_separators(self.buf))

    def separators_arrays(self, name: str) -> np.ndarray:
        """:meth:`_separators` in numpy, the reference."""

        def find() -> np.ndarray:
            if name == "line":
                return np.sort(
                    np.concatenate(
                        (self._bytes_arrays(10, 13, 125, 93), self.literal_newlines_arrays(), self.row_ends_arrays())
                    )
                )
            if name == "brace":
                return self._bytes_arrays(123, 125, 91, 93)
            if name == "html":
                return self.row_ends_arrays()
            return np.sort(np.concatenate((self._bytes_arrays(10, 13, 91, 93), self.literal_newlines_arrays())))

        return find()

    def all_records(
        self, layout: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """What :func:`paitient.rules.edm.compiled_records.all_layouts` counts with, for every token at once
        and whatever the index: per layout but the windows (in the order of :data:`LAYOUTS`) and token, its
        record numbered densely (-1: none) and the value-like tokens of that record over the whole text (a
        record over an index's cap counts for none of it; a pooled record without any, never); the records of
        each layout; which layouts pool; each token's ordinal; which layouts' records are there. The segment
        layouts' come at once, the pooled ones' (a pass over the text for the keys, one for the places) when
        ``layout`` is one of them. Computed once per text."""
        names = LAYOUTS[:-1]
        n = len(self.start)

        def segments() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
            rid = np.full((len(names), n), -1, dtype=np.int64)
            size = np.full((len(names), n), _NEVER, dtype=np.int64)
            records = np.zeros(len(names), dtype=np.int64)
            vl = self.value_like
            for i, name in enumerate(names):
                if name in _SEGMENTS:
                    seps = self._separators(name)
                    records[i] = compiled_records.segment_row(
                        self.start, vl, seps, name != "html", _NEVER, rid[i], size[i]
                    )
            pooled = np.array([name not in _SEGMENTS for name in names])
            return (
                rid,
                size,
                records,
                pooled,
                compiled_records.ordinals(self.start, len(self.tokens.word_start)),
                ~pooled,
            )

        found = self._cached("all", segments)
        rid, size, records, pooled, _, ready = found
        if layout < len(names) and not ready[layout]:
            for i, name in enumerate(names):
                if pooled[i]:
                    records[i] = compiled_records.pooled_row(
                        self._pooled(name), self.value_like, _NEVER, rid[i], size[i]
                    )
                    ready[i] = True
        return found

    # the layouts

    def rows(
        self,
        name: str,
        tok: np.ndarray,
        row: np.ndarray,
        col: np.ndarray,
        nrows: int,
        columns: int,
        found: tuple[np.ndarray, np.ndarray],
    ) -> np.ndarray:
        """Rows that the hits (token, row, column) reveal in layout ``name``; ``found`` is (token, column)
        of every value of the dataset found in the text, to tell row-like records from column-like ones.
        The records are found here, the counting within them is compiled
        (:mod:`paitient.rules.edm.compiled_records`); :meth:`rows_arrays` is the reference."""
        if name == "window":
            return rows_in_windows(self.ordinal(tok), row, col)
        cap = record_cap(columns)
        rec = self._records(name, tok, cap)
        pooled = name not in _SEGMENTS
        if pooled:  # records numbered 0, 1, ... in the order of their ids
            ids, rec = compiled_records.dense(rec)
            records = len(ids)
        else:
            records = len(self._separators(name)) + 1
        words = len(self.tokens.word_start)
        at, any_rows = compiled_records.kept(rec, records, tok, row, col, nrows, cap, words, pooled, MIN_ROW_COLUMNS)
        if not any_rows:  # most hits are chance ones: spare the sizes and shapes of records
            return np.zeros(0, dtype=np.int64)
        all_tok, all_col = found
        found_ids = self._record_ids(name, all_tok)
        if pooled:
            found_ids = _number_in(ids, found_ids)
            uniq, counts = self._sizes(name)
            at_size = _number_in(uniq, ids)
            too_big = (at_size < 0) | (counts[np.maximum(at_size, 0)] > cap) if len(uniq) else np.ones(records, bool)
        else:
            too_big = np.zeros(records, dtype=bool)
        return compiled_records.revealed(
            rec, records, row, col, at, (found_ids, all_tok, all_col), too_big, nrows, COLUMN_LIKE_MIN, MIN_ROW_COLUMNS
        )

    def rows_arrays(
        self,
        name: str,
        tok: np.ndarray,
        row: np.ndarray,
        col: np.ndarray,
        nrows: int,
        columns: int,
        found: tuple[np.ndarray, np.ndarray],
    ) -> np.ndarray:
        """:meth:`rows` in whole-array numpy, the reference."""
        if name == "window":
            return rows_in_windows_arrays(self.ordinal(tok), row, col)
        cap = record_cap(columns)
        rec = self._records(name, tok, cap)
        keep = np.flatnonzero(rec >= 0)
        rec, tok, row, col = rec[keep], tok[keep], row[keep], col[keep]
        if name not in _SEGMENTS and len(rec):
            # the distinct numbers hit in a record already count towards its size: a record over the
            # cap on those alone (a printed column of a dump) needs no counting over the whole text
            dense = _densify(rec)
            nums = tok >= len(self.tokens.word_start)
            width = len(self.start) + 1
            pairs = sorted_unique(dense[nums] * width + tok[nums])
            fits = np.bincount(pairs // width, minlength=int(dense.max()) + 1)[dense] <= cap
            rec, tok, row, col = rec[fits], tok[fits], row[fits], col[fits]
        found_rows = rows_in_records(_densify(rec), row, col, nrows)
        if not len(found_rows):  # most hits are chance ones: spare the sizes and shapes of records
            return found_rows
        ok = ~self._column_like(name, rec, *found)
        if name not in _SEGMENTS:
            uniq, counts = self._sizes(name)
            if len(uniq):
                i = np.minimum(np.searchsorted(uniq, rec), len(uniq) - 1)
                ok &= (uniq[i] == rec) & (counts[i] <= cap)
            else:  # no value-like token in any record: none is a record of a row
                ok[:] = False
        return rows_in_records(_densify(rec[ok]), row[ok], col[ok], nrows)

    def _records(self, name: str, tok: np.ndarray, cap: int) -> np.ndarray:
        """The record of each token ``tok`` in layout ``name`` (not ``window``), -1 where none; a segment
        holding more than ``cap`` value-like tokens is none."""
        if name in _SEGMENTS:
            return self._segments(name, tok, cap)
        if "ids:" + name in self._cache or len(self.start) <= 4 * len(tok) + 4096:  # small text: all at once
            ids: np.ndarray = self._pooled(name)[tok]
            return ids
        # only the hits' tokens for now: the whole text only if some record might count
        ids = getattr(self, "_" + name)(self.start[tok])
        return ids

    def _record_ids(self, name: str, tok: np.ndarray) -> np.ndarray:
        """The record of each token ``tok`` in layout ``name``, segments not capped."""
        if name in _SEGMENTS:
            ids: np.ndarray = np.searchsorted(self._separators(name), self.start[tok])
        else:
            ids = self._pooled(name)[tok]
        return ids

    def _column_like(self, name: str, rec: np.ndarray, all_tok: np.ndarray, all_col: np.ndarray) -> np.ndarray:
        """Whether each record in ``rec`` has more than half of its printed dataset values (tokens with
        a hit), and at least COLUMN_LIKE_MIN of them, in one column."""
        ids = self._record_ids(name, all_tok)
        wanted = sorted_unique(rec)
        at = np.minimum(np.searchsorted(wanted, ids), len(wanted) - 1)
        mine = wanted[at] == ids
        at, tok, cols = at[mine].astype(np.int64), all_tok[mine].astype(np.int64), all_col[mine].astype(np.int64)
        width = int(max(tok.max(initial=0), 0)) + 1
        tokens = sorted_unique(at * width + tok)  # distinct tokens per record
        per_record = np.bincount(tokens // width, minlength=len(wanted))
        pairs = sorted_unique((at * 1024 + cols) * width + tok) // width  # distinct (record, column, token)
        groups, counts = _runs_of(pairs)
        top = np.zeros(len(wanted), dtype=np.int64)
        np.maximum.at(top, groups // 1024, counts)
        column_like = (2 * top > per_record) & (top >= COLUMN_LIKE_MIN)
        return column_like[np.searchsorted(wanted, rec)]

    def _segments(self, name: str, tok: np.ndarray, cap: int) -> np.ndarray:
        """Segment (between separators) of each token, -1 where the segment holds too many values."""
        seps = self._separators(name)
        if not len(seps):  # one segment: the whole text (html: none)
            whole = name != "html" and len(self.sorted_starts[1]) <= cap
            return np.full(len(tok), 0 if whole else -1, dtype=np.int64)
        sizes = self._cached("segs:" + name, lambda: compiled_records.segment_sizes(seps, self.sorted_starts[1]))
        return compiled_records.segments(seps, self.start[tok], sizes, cap)

    def segments_arrays(self, name: str, tok: np.ndarray, cap: int) -> np.ndarray:
        """:meth:`_segments` in numpy, the reference (for a text with separators)."""
        seps = self._separators(name)
        rec = np.searchsorted(seps, self.start[tok])
        lo = np.where(rec > 0, seps[np.maximum(rec - 1, 0)], -1)
        hi = np.where(rec < len(seps), seps[np.minimum(rec, len(seps) - 1)], len(self.buf))
        vl = self.sorted_starts[1]
        size = np.searchsorted(vl, hi) - np.searchsorted(vl, lo, "right")
        return np.where(size <= cap, rec, -1)

    def _pooled(self, name: str) -> np.ndarray:
        """Record ids of every token in a pooling layout (key, position), -1 where none."""

        def find() -> np.ndarray:
            ids: np.ndarray = getattr(self, "_" + name)(self.start)
            return ids

        return self._cached("ids:" + name, find)

    def _sizes(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Distinct record ids of a pooling layout over all tokens, and their value-like token counts."""

        def count() -> tuple[np.ndarray, np.ndarray]:
            ids = self._pooled(name)[self.value_like]
            ids = ids[ids >= 0]
            uniq = sorted_unique(ids)
            return uniq, np.bincount(np.searchsorted(uniq, ids), minlength=len(uniq))

        return self._cached("size:" + name, count)

    def _key(self, t: np.ndarray) -> np.ndarray:
        """A hash of the key before ``:``, or else of the first run of the line, for tokens at ``t``. One
        compiled pass (:func:`paitient.rules.edm.compiled_records.keys`); :meth:`key_arrays` is the reference."""
        runs = self._runs()
        if not len(runs[0]):
            return np.full(len(t), -1, dtype=np.int64)
        return compiled_records.keys(self.buf, runs, self.newlines, t, np.array(_KEY_LANES, dtype=np.uint64))

    def key_arrays(self, t: np.ndarray) -> np.ndarray:
        """:meth:`_key` in numpy, the reference."""
        b = self.buf
        rs, re_ = self._runs()
        if not len(rs):
            return np.full(len(t), -1, dtype=np.int64)
        p = t - 1
        p = p - ((b[p] == 34) | (b[p] == 39))
        p = p - (b[p] == 32)
        colon = b[p] == 58
        kend = p - ((b[p - 1] == 34) | (b[p - 1] == 39))
        r = np.searchsorted(rs, kend - 1, "right") - 1
        rr = np.maximum(r, 0)
        has_key = colon & (r >= 0) & (re_[rr] == kend)
        nl = self.newlines
        i = np.searchsorted(nl, t) - 1
        line_start = np.where(i >= 0, nl[np.maximum(i, 0)] + 1, 0) if len(nl) else np.zeros(len(t), dtype=np.int64)
        first = np.minimum(np.searchsorted(rs, line_start), len(rs) - 1)
        key_run = np.where(has_key, rr, first)
        s = rs[key_run]
        ln = np.clip(re_[key_run] - s, 1, MAX_WORD)
        return (word_hash(word_view(b), s, ln, *_KEY_LANES) >> np.uint64(1)).astype(np.int64)

    def _position(self, t: np.ndarray) -> np.ndarray:
        """(paragraph, place from the end of the line or list) for tokens at ``t``; -1 on short lines. One
        compiled pass (:func:`paitient.rules.edm.compiled_records.places`); :meth:`position_arrays` is the
        reference."""
        rs, _ = self._runs()
        if not len(rs):
            return np.full(len(t), -1, dtype=np.int64)

        def blank_lines() -> np.ndarray:
            nl = self.newlines
            blank: np.ndarray = nl[1:][np.diff(nl) == 1] if len(nl) > 1 else nl[:0]
            return blank

        blank = self._cached("blank", blank_lines)
        return compiled_records.places(rs, self._separators("position"), blank, t, MIN_ROW_COLUMNS)

    def position_arrays(self, t: np.ndarray) -> np.ndarray:
        """:meth:`_position` in numpy, the reference."""
        rs, _ = self._runs()
        if not len(rs):
            return np.full(len(t), -1, dtype=np.int64)
        seps = self._separators("position")
        # per line or list: the index of its first and its last run
        bounds = np.searchsorted(rs, seps)
        first = np.concatenate(([0], bounds))
        last = np.concatenate((bounds, [len(rs)])) - 1
        cont = np.searchsorted(seps, t)
        r = np.searchsorted(rs, t, "right") - 1  # the token's run
        wide = (last[cont] - first[cont] + 1) >= MIN_ROW_COLUMNS
        nl = self.newlines
        blank = nl[1:][np.diff(nl) == 1] if len(nl) > 1 else nl[:0]
        para = np.searchsorted(blank, t) if len(blank) else 0
        return np.where(wide, para * (1 << 32) + (last[cont] - r), -1)


def rows_in_records(rec: np.ndarray, row: np.ndarray, col: np.ndarray, nrows: int) -> np.ndarray:
    """Rows with values of MIN_ROW_COLUMNS distinct columns in one record (dense ids ``rec`` >= 0)."""
    if len(rec) < MIN_ROW_COLUMNS:
        return np.zeros(0, dtype=np.int64)
    key = (rec.astype(np.uint64) * np.uint64(nrows) + row.astype(np.uint64)) << _COL_BITS | col.astype(np.uint64)
    u = sorted_unique(key)
    g = u >> _COL_BITS
    # a (record, row) group with 3+ distinct columns: the entry two places on has the same group
    hit = g[2:] == g[:-2]
    return sorted_unique((g[2:][hit] % np.uint64(nrows)).astype(np.int64))


def rows_in_windows(ordinal: np.ndarray, row: np.ndarray, col: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """Rows with values of MIN_ROW_COLUMNS distinct columns among ``window`` consecutive tokens: one compiled
    pass (:func:`paitient.rules.edm.compiled_records.windows`); :func:`rows_in_windows_arrays` is the
    reference."""
    if len(row) < MIN_ROW_COLUMNS:
        return np.zeros(0, dtype=np.int64)
    if int(row.max()) >= 1 << 23 or int(ordinal.max()) >= 1 << 30:  # renumber to fit the packed key
        rows = sorted_unique(row.astype(np.int64))
        found = compiled_records.windows(_densify(ordinal), np.searchsorted(rows, row), col, window, MIN_ROW_COLUMNS)
        result: np.ndarray = rows[found]
        return result
    return compiled_records.windows(ordinal, row, col, window, MIN_ROW_COLUMNS)


def rows_in_windows_arrays(ordinal: np.ndarray, row: np.ndarray, col: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """Rows with values of MIN_ROW_COLUMNS distinct columns among ``window`` consecutive tokens.

    Per row, consecutive hits of one column collapse into a run (first and last token); a window holds
    three columns exactly when some three consecutive runs, the outer two of different columns, span
    fewer than ``window`` tokens.
    """
    if len(row) < MIN_ROW_COLUMNS:
        return np.zeros(0, dtype=np.int64)
    rows = None
    if int(row.max()) >= 1 << 24 or int(ordinal.max()) >= 1 << 30:  # renumber to fit the packed key
        rows = sorted_unique(row.astype(np.int64))
        row = np.searchsorted(rows, row)
        ordinal = _densify(ordinal)
    key = (row.astype(np.uint64) << np.uint64(40)) | (ordinal.astype(np.uint64) << _COL_BITS) | col.astype(np.uint64)
    key = np.sort(key)
    r = (key >> np.uint64(40)).astype(np.int64)
    o = ((key >> _COL_BITS) & np.uint64((1 << 30) - 1)).astype(np.int64)
    c = (key & np.uint64((1 << 10) - 1)).astype(np.int64)
    new = np.empty(len(r), dtype=bool)
    new[0] = True
    new[1:] = (r[1:] != r[:-1]) | (c[1:] != c[:-1])
    starts = np.flatnonzero(new)
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:] - 1
    ends[-1] = len(r) - 1
    rr, cc, first, last = r[starts], c[starts], o[starts], o[ends]
    if len(rr) < MIN_ROW_COLUMNS:
        return np.zeros(0, dtype=np.int64)
    ok = (rr[:-2] == rr[2:]) & (cc[:-2] != cc[2:]) & (first[2:] - last[:-2] < window)
    found = sorted_unique(rr[:-2][ok])
    return found if rows is None else rows[found]
