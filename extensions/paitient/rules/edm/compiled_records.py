"""The counting half of a record layout, compiled (numba): which rows the hits of one layout reveal.

:meth:`paitient.rules.edm.records.Layout.rows` finds each hit's record (numpy, per layout) and then counts
within the records: the pooled layouts' cap on the distinct numbers hit, the rows with values of three columns
in one record, the records that look like a printed column, the pooled records too large over the whole
text. :meth:`~paitient.rules.edm.records.Layout.rows_arrays` keeps that counting in whole-array numpy (a few
dozen numpy calls per layout, six layouts per index: most of a small output's cost), the reference.
:func:`kept` and :func:`revealed` do the same counting in two passes, by sorting inside one call:

- :func:`kept`: the hits in a record that still counts after the cap on distinct numbers, and whether any row
  has values of three columns in one record (most texts: none, and the rest is spared);
- :func:`revealed`: of those, the rows with values of three columns in one record that is neither
  column-like nor (pooled layouts) over the cap on value-like tokens over the whole text.

The rows are the reference's set, sorted; the reference numbers records densely before it counts, these
passes group hits of equal record ids, which is the same grouping.

Compiled at first use, the machine code kept for later processes (:func:`paitient.rules.edm.compiled._jit`);
:func:`warm_up` loads every compiled function. Constants of other modules go in as arguments.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from paitient.rules.edm.compiled import _jit
from paitient.rules.edm.compiled_match import _MIX, _words
from paitient.rules.edm.hashing import _BYTE_MASK, MAX_WORD, word_view


def _radix_sort_py(keys: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``keys`` (int64, none negative) sorted, with ``order`` (int64) carried along: a byte at a time from
    the lowest, as many bytes as the largest key has (numba's comparison sort takes several times longer on
    the few thousand keys of a small output)."""
    n = len(keys)
    top = np.int64(0)
    for k in range(n):
        top = max(top, keys[k])
    src_k, src_o = keys, order
    dst_k = np.empty(n, dtype=np.int64)
    dst_o = np.empty(n, dtype=np.int64)
    counts = np.empty(257, dtype=np.int64)
    shift = np.int64(0)
    while shift < 64 and (top >> shift) > 0:
        counts[:] = 0
        for k in range(n):
            counts[((src_k[k] >> shift) & 255) + 1] += 1
        for d in range(1, 257):
            counts[d] += counts[d - 1]
        for k in range(n):
            d = (src_k[k] >> shift) & 255
            at = counts[d]
            dst_k[at] = src_k[k]
            dst_o[at] = src_o[k]
            counts[d] = at + 1
        src_k, dst_k = dst_k, src_k
        src_o, dst_o = dst_o, src_o
        shift += 8
    return src_k, src_o


_radix_sort = _jit(_radix_sort_py)


def _dense_py(rec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(The distinct values >= 0 of ``rec``, ascending; each item's place among them, -1 where negative.)"""
    n = len(rec)
    keys = np.empty(n, dtype=np.int64)
    order = np.empty(n, dtype=np.int64)
    m = 0
    for k in range(n):
        if rec[k] >= 0:
            keys[m] = rec[k]
            order[m] = k
            m += 1
    keys, order = _radix_sort(keys[:m], order[:m])
    dense = np.full(n, -1, dtype=np.int64)
    ids = np.empty(m, dtype=np.int64)
    d = -1
    for k in range(m):
        if k == 0 or keys[k] != keys[k - 1]:
            d += 1
            ids[d] = keys[k]
        dense[order[k]] = d
    return ids[: d + 1], dense


_dense = _jit(_dense_py)


def dense(rec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(The distinct record ids >= 0 in ``rec``, ascending; each item's place among them, -1 where it has
    none): ``np.unique(rec, return_inverse=True)`` without the negative ids."""
    ids, numbers = _dense(rec.astype(np.int64, copy=False))
    return ids, numbers


def _distinct_sorted_py(keys: np.ndarray) -> np.ndarray:
    """``keys`` (none negative) sorted, each value once."""
    keys, _ = _radix_sort(keys, np.empty(len(keys), dtype=np.int64))
    m = 0
    for k in range(len(keys)):
        if k == 0 or keys[k] != keys[m - 1]:
            keys[m] = keys[k]
            m += 1
    return keys[:m]


_distinct_sorted = _jit(_distinct_sorted_py)


def _rows_of_py(
    rec: np.ndarray, row: np.ndarray, col: np.ndarray, at: np.ndarray, nrows: int, min_columns: int
) -> np.ndarray:
    """Sorted unique rows with hits of ``min_columns`` distinct columns in one record, over the hits ``at``."""
    n = len(at)
    if n < min_columns:
        return np.zeros(0, dtype=np.int64)
    keys = np.empty(n, dtype=np.int64)
    for k in range(n):
        h = at[k]
        keys[k] = (rec[h] * nrows + row[h]) * 1024 + col[h]
    pairs = _distinct_sorted(keys)  # (record, row, column), each once
    out = np.empty(len(pairs), dtype=np.int64)
    found = 0
    run = 0
    for k in range(len(pairs)):
        group = pairs[k] >> np.int64(10)
        run = run + 1 if k > 0 and group == pairs[k - 1] >> np.int64(10) else 1
        if run == min_columns:
            out[found] = group % nrows
            found += 1
    rows: np.ndarray = _distinct_sorted(out[:found])
    return rows


_rows_of = _jit(_rows_of_py)


def _kept_py(
    rec: np.ndarray,
    records: int,
    tok: np.ndarray,
    row: np.ndarray,
    col: np.ndarray,
    nrows: int,
    cap: int,
    words: int,
    pooled: bool,
    min_columns: int,
) -> tuple[np.ndarray, bool]:
    n = len(rec)
    at = np.empty(n, dtype=np.int64)
    count = 0
    width = np.int64(1)
    for i in range(n):
        if rec[i] >= 0:
            at[count] = i
            count += 1
            width = max(width, tok[i] + 1)
    at = at[:count]
    if pooled and count:
        # per record, the distinct numbers hit in it; a record over the cap on those alone does not count
        keys = np.empty(count, dtype=np.int64)
        m = 0
        for k in range(count):
            h = at[k]
            if tok[h] >= words:
                keys[m] = rec[h] * width + tok[h]
                m += 1
        numbers = np.zeros(records, dtype=np.int64)
        for key in _distinct_sorted(keys[:m]):
            numbers[key // width] += 1
        left = 0
        for k in range(count):
            h = at[k]
            if numbers[rec[h]] <= cap:
                at[left] = h
                left += 1
        at = at[:left]
    any_rows = len(_rows_of(rec, row, col, at, nrows, min_columns)) > 0
    return at, any_rows


_kept = _jit(_kept_py)


def kept(
    rec: np.ndarray,
    records: int,
    tok: np.ndarray,
    row: np.ndarray,
    col: np.ndarray,
    nrows: int,
    cap: int,
    words: int,
    pooled: bool,
    min_columns: int,
) -> tuple[np.ndarray, bool]:
    """(The hits, by position, in a record (``rec``: 0 to ``records`` - 1, -1 for none) that counts: in a
    pooled layout, one where at most ``cap`` distinct numbers (tokens from ``words`` on) are hit; whether any
    row (of ``nrows``) has hits of ``min_columns`` distinct columns in one record of those.)"""
    at, any_rows = _kept(
        rec, int(records), tok, row, col, int(nrows), int(cap), int(words), bool(pooled), int(min_columns)
    )
    return at, bool(any_rows)


def _revealed_py(
    rec: np.ndarray,
    records: int,
    row: np.ndarray,
    col: np.ndarray,
    at: np.ndarray,
    ids: np.ndarray,
    found_tok: np.ndarray,
    found_col: np.ndarray,
    too_big: np.ndarray,
    nrows: int,
    least: int,
    min_columns: int,
) -> np.ndarray:
    n = len(at)
    wanted = np.zeros(records, dtype=np.bool_)
    for k in range(n):
        wanted[rec[at[k]]] = True
    # per record: its distinct tokens found, and the most of them in one column (column-like records)
    m = len(ids)
    width = np.int64(1)
    for k in range(m):
        width = max(width, found_tok[k] + 1)
    tokens = np.empty(m, dtype=np.int64)
    pairs = np.empty(m, dtype=np.int64)
    mine = 0
    for k in range(m):
        r = ids[k]
        if r >= 0 and wanted[r]:
            tokens[mine] = r * width + found_tok[k]
            pairs[mine] = (r * 1024 + found_col[k]) * width + found_tok[k]
            mine += 1
    per_record = np.zeros(records, dtype=np.int64)
    for key in _distinct_sorted(tokens[:mine]):
        per_record[key // width] += 1
    top = np.zeros(records, dtype=np.int64)
    run = 0
    pairs = _distinct_sorted(pairs[:mine])
    for k in range(len(pairs)):
        group = pairs[k] // width
        run = run + 1 if k > 0 and group == pairs[k - 1] // width else 1
        r = group // 1024
        top[r] = max(top[r], run)
    ok = np.empty(n, dtype=np.int64)
    left = 0
    for k in range(n):
        r = rec[at[k]]
        if (2 * top[r] > per_record[r] and top[r] >= least) or too_big[r]:
            continue
        ok[left] = at[k]
        left += 1
    rows: np.ndarray = _rows_of(rec, row, col, ok[:left], nrows, min_columns)
    return rows


_revealed = _jit(_revealed_py)


def revealed(
    rec: np.ndarray,
    records: int,
    row: np.ndarray,
    col: np.ndarray,
    at: np.ndarray,
    found: tuple[np.ndarray, np.ndarray, np.ndarray],
    too_big: np.ndarray,
    nrows: int,
    least: int,
    min_columns: int,
) -> np.ndarray:
    """Sorted unique rows (of ``nrows``) with hits (of those at ``at``) of ``min_columns`` distinct columns in
    one record (``rec``, 0 to ``records`` - 1) that is not column-like (more than half, and at least
    ``least``, of the distinct tokens found in it of one column; ``found`` is (record or -1, token, column) of
    every value of the dataset found in the text) nor ``too_big``."""
    ids, found_tok, found_col = found
    rows: np.ndarray = _revealed(
        rec,
        int(records),
        row,
        col,
        at,
        ids.astype(np.int64, copy=False),
        found_tok.astype(np.int64, copy=False),
        found_col.astype(np.int64, copy=False),
        too_big,
        int(nrows),
        int(least),
        int(min_columns),
    )
    return rows


def _segment_row_py(
    start: np.ndarray, vl: np.ndarray, seps: np.ndarray, whole: bool, never: int, rid: np.ndarray, size: np.ndarray
) -> int:
    n = len(start)
    ns = len(seps)
    if not ns:  # one segment: the whole text, or (not ``whole``) none
        count = 0
        for t in range(n):
            count += 1 if vl[t] else 0
        for t in range(n):
            rid[t] = 0 if whole else -1
            size[t] = count if whole else never
        return 1 if whole else 0
    sizes = np.zeros(ns + 1, dtype=np.int64)
    for t in range(n):
        j = np.searchsorted(seps, start[t])
        rid[t] = j
        if vl[t] and not (j < ns and seps[j] == start[t]):  # a value-like token on a separator is in none
            sizes[j] += 1
    for t in range(n):
        size[t] = sizes[rid[t]]
    return ns + 1


_segment_row = _jit(_segment_row_py)


def segment_row(
    start: np.ndarray, vl: np.ndarray, seps: np.ndarray, whole: bool, never: int, rid: np.ndarray, size: np.ndarray
) -> int:
    """Fill ``rid`` and ``size`` for the tokens at offsets ``start`` (``vl``: value-like) in a segment layout:
    the segment of each (the separators ``seps`` before it) and the value-like tokens strictly inside it; a
    text without separators is one segment if ``whole``, else none (-1, ``never`` values). The records."""
    return int(_segment_row(start, vl, seps, bool(whole), int(never), rid, size))


def _ordinals_py(start: np.ndarray, words: int) -> np.ndarray:
    n = len(start)
    out = np.empty(n, dtype=np.int64)
    ascending = True
    for t in range(1, n):
        if t != words and start[t] < start[t - 1]:
            ascending = False
            break
    if not ascending:  # not two ascending runs: sort
        distinct = np.unique(start)
        for t in range(n):
            out[t] = np.searchsorted(distinct, start[t])
        return out
    # the words' offsets and the numbers' offsets each ascend: merge them
    i, j = 0, words
    rank = -1
    last = np.int64(-1)
    while i < words or j < n:
        if j >= n or (i < words and start[i] <= start[j]):
            k = i
            i += 1
        else:
            k = j
            j += 1
        if start[k] != last:
            rank += 1
            last = start[k]
        out[k] = rank
    return out


_ordinals = _jit(_ordinals_py)


def ordinals(start: np.ndarray, words: int) -> np.ndarray:
    """The rank of each offset (int64, none negative) among the distinct offsets of ``start``, whose first
    ``words`` and the rest each ascend as the tokenizer gives them (any order is ranked, more slowly)."""
    result: np.ndarray = _ordinals(start.astype(np.int64, copy=False), int(words))
    return result


def _pooled_row_py(ids: np.ndarray, vl: np.ndarray, never: int, rid: np.ndarray, size: np.ndarray) -> int:
    n = len(ids)
    # records numbered as they first appear, through an open-addressing table of the ids (only which tokens
    # share a record matters, not the numbers' order)
    slots = 16
    while slots < 2 * n:
        slots *= 2
    key = np.empty(slots, dtype=np.int64)
    number = np.full(slots, -1, dtype=np.int64)
    distinct = 0
    for t in range(n):
        x = ids[t]
        if x < 0:
            rid[t] = -1
            continue
        s = np.int64((np.uint64(x) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)) & (slots - 1)
        while number[s] >= 0 and key[s] != x:
            s = (s + 1) & (slots - 1)
        if number[s] < 0:
            key[s] = x
            number[s] = distinct
            distinct += 1
        rid[t] = number[s]
    counts = np.zeros(distinct, dtype=np.int64)
    for t in range(n):
        if vl[t] and rid[t] >= 0:
            counts[rid[t]] += 1
    for t in range(n):
        d = rid[t]
        size[t] = never if d < 0 or counts[d] == 0 else counts[d]
    return distinct


_pooled_row = _jit(_pooled_row_py)


def pooled_row(ids: np.ndarray, vl: np.ndarray, never: int, rid: np.ndarray, size: np.ndarray) -> int:
    """Fill ``rid`` and ``size`` for the tokens of a pooled layout (their record ``ids``, -1 none; ``vl``:
    value-like): the record numbered densely in the order records first appear, and the value-like tokens of
    that record over the whole text (``never`` where it has none: no row's record). The records."""
    return int(_pooled_row(ids.astype(np.int64, copy=False), vl, int(never), rid, size))


def _all_layouts_py(
    rid: np.ndarray,
    size: np.ndarray,
    records: np.ndarray,
    pooled: np.ndarray,
    ordinal: np.ndarray,
    ready: np.ndarray,
    start: int,
    tok: np.ndarray,
    row: np.ndarray,
    col: np.ndarray,
    revealed: np.ndarray,
    candidates: np.ndarray,
    nrows: int,
    cap: int,
    words: int,
    window: int,
    least: int,
    min_columns: int,
) -> tuple[np.ndarray, int]:
    n = len(tok)
    cur = np.arange(n)
    hrec = np.empty(n, dtype=np.int64)
    layouts = rid.shape[0]
    for layout in range(start, layouts + 1):
        # the hits of rows not revealed yet that may still be (as the layouts one by one narrow them down)
        m = 0
        for k in range(len(cur)):
            h = cur[k]
            if candidates[row[h]] and not revealed[row[h]]:
                cur[m] = h
                m += 1
        cur = cur[:m]
        if m < min_columns:
            break
        if layout == layouts:  # the windows, last
            o = np.empty(m, dtype=np.int64)
            rr = np.empty(m, dtype=np.int64)
            cc = np.empty(m, dtype=np.int64)
            for k in range(m):
                o[k] = ordinal[tok[cur[k]]]
                rr[k] = row[cur[k]]
                cc[k] = col[cur[k]]
            if rr.max() >= 1 << 23 or o.max() >= 1 << 30:  # renumber to fit the packed key
                distinct = np.unique(rr)
                found = distinct[
                    _windows(np.searchsorted(np.unique(o), o), np.searchsorted(distinct, rr), cc, window, min_columns)
                ]
            else:
                found = _windows(o, rr, cc, window, min_columns)
            for r in found:
                revealed[r] = True
            break
        if not ready[layout]:  # its records are still to be found
            return cur[:0], layout
        hrec[:] = -1
        for k in range(m):
            h = cur[k]
            t = tok[h]
            if rid[layout, t] >= 0 and size[layout, t] <= cap:
                hrec[h] = rid[layout, t]
        at, any_rows = _kept(hrec, records[layout], tok, row, col, nrows, cap, words, pooled[layout], min_columns)
        if not any_rows:
            continue
        found_ids = np.empty(n, dtype=np.int64)
        for h in range(n):
            found_ids[h] = rid[layout, tok[h]]
        none = np.zeros(records[layout], dtype=np.bool_)
        for r in _revealed(hrec, records[layout], row, col, at, found_ids, tok, col, none, nrows, least, min_columns):
            revealed[r] = True
    return np.flatnonzero(revealed), -1


_all_layouts = _jit(_all_layouts_py)


def all_layouts(
    records: Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    hits: tuple[np.ndarray, np.ndarray, np.ndarray],
    revealed: np.ndarray,
    candidates: np.ndarray,
    nrows: int,
    cap: int,
    words: int,
    window: int,
    least: int,
    min_columns: int,
) -> np.ndarray:
    """Every layout's counting in one call (two where the pooled layouts' records are found only when the
    layouts before them leave rows to count): the rows (sorted) of ``revealed`` (a mask over the ``nrows``
    rows, set in place) once each layout in turn has added the rows it finds among the hits (token, row,
    column) of rows that are ``candidates`` and not revealed yet, as
    :meth:`paitient.rules.edm.match.Scan.rows_by_layout` finds them. ``records(layout)`` gives (per segment
    and pooled layout and token: its record numbered densely or -1; the value-like tokens of that record;
    records per layout; whether the layout pools; each token's ordinal; whether each layout's records are
    there, that one's among them), :meth:`paitient.rules.edm.records.Layout.all_records`."""
    tok, row, col = hits
    tok = tok.astype(np.int64, copy=False)
    row = row.astype(np.int64, copy=False)
    col = col.astype(np.int64, copy=False)
    start = 0
    while True:
        rid, size, count, pooled, ordinal, ready = records(start)
        rows, start = _all_layouts(
            rid,
            size,
            count,
            pooled,
            ordinal,
            ready,
            start,
            tok,
            row,
            col,
            revealed,
            candidates,
            int(nrows),
            int(cap),
            int(words),
            int(window),
            int(least),
            int(min_columns),
        )
        if start < 0:
            result: np.ndarray = rows
            return result


def _positions_py(buf: np.ndarray, table: np.ndarray) -> np.ndarray:
    n = len(buf)
    count = 0
    for i in range(n):
        if table[buf[i]]:
            count += 1
    out = np.empty(count, dtype=np.int64)
    count = 0
    for i in range(n):
        if table[buf[i]]:
            out[count] = i
            count += 1
    return out


_positions = _jit(_positions_py)


def positions(buf: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Ascending offsets of the bytes of ``buf`` (uint8) whose entry in ``table`` (256 bools) is set."""
    result: np.ndarray = _positions(buf, table)
    return result


def _class_runs_py(buf: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(buf)
    count = 0
    inside = False
    for i in range(n):
        now = table[buf[i]]
        if now and not inside:
            count += 1
        inside = now
    starts = np.empty(count, dtype=np.int64)
    ends = np.empty(count, dtype=np.int64)
    count = 0
    inside = False
    for i in range(n):
        now = table[buf[i]]
        if now and not inside:
            starts[count] = i
        elif inside and not now:
            ends[count] = i
            count += 1
        inside = now
    return starts, ends


_class_runs = _jit(_class_runs_py)


def class_runs(buf: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and ends of the runs of bytes of ``buf`` (uint8; its first and last byte in none) whose entry
    in ``table`` (256 bools) is set: :func:`paitient.rules.edm.tokens.runs` of that mask."""
    starts, ends = _class_runs(buf, table)
    return starts, ends


def _value_like_py(buf: np.ndarray, word_start: np.ndarray, word_len: np.ndarray, numbers: int) -> np.ndarray:
    nw = len(word_start)
    out = np.ones(nw + numbers, dtype=np.bool_)
    for i in range(nw):
        s = word_start[i]
        n = word_len[i]
        digits = 0
        dash = False
        # the first 8 bytes, and of the last 8 those the first 8 missed
        for p in range(s, s + min(n, 8)):
            digits += 1 if (buf[p] - np.uint8(48)) < np.uint8(10) else 0
            dash |= buf[p] == 45
        for p in range(max(s + 8, s + n - 8), s + n):
            digits += 1 if (buf[p] - np.uint8(48)) < np.uint8(10) else 0
            dash |= buf[p] == 45
        out[i] = (digits > 0 and dash) or digits >= 4
    return out


_value_like = _jit(_value_like_py)


def value_like(buf: np.ndarray, word_start: np.ndarray, word_len: np.ndarray, numbers: int) -> np.ndarray:
    """Per token (the words at ``word_start``, ``word_len`` in ``buf``, then ``numbers`` numbers): whether it
    looks like a value (see :attr:`paitient.rules.edm.records.Layout.value_like`)."""
    result: np.ndarray = _value_like(
        buf, word_start.astype(np.int64, copy=False), word_len.astype(np.int64, copy=False), int(numbers)
    )
    return result


def _segment_sizes_py(seps: np.ndarray, vl: np.ndarray) -> np.ndarray:
    """Per segment (before the first separator, between two, after the last): the offsets of ``vl`` (sorted)
    strictly inside it."""
    ns = len(seps)
    sizes = np.zeros(ns + 1, dtype=np.int64)
    j = 0
    for v in vl:
        while j < ns and seps[j] < v:
            j += 1
        if j < ns and seps[j] == v:  # on a separator: inside no segment
            continue
        sizes[j] += 1
    return sizes


_segment_sizes = _jit(_segment_sizes_py)


def segment_sizes(seps: np.ndarray, vl: np.ndarray) -> np.ndarray:
    """Value-like tokens (their sorted offsets ``vl``) in each segment between the separators ``seps``."""
    result: np.ndarray = _segment_sizes(seps, vl)
    return result


def _segments_py(seps: np.ndarray, at: np.ndarray, sizes: np.ndarray, cap: int) -> np.ndarray:
    out = np.empty(len(at), dtype=np.int64)
    for i in range(len(at)):
        rec = np.searchsorted(seps, at[i])
        out[i] = rec if sizes[rec] <= cap else -1
    return out


_segments = _jit(_segments_py)


def segments(seps: np.ndarray, at: np.ndarray, sizes: np.ndarray, cap: int) -> np.ndarray:
    """The segment of each token at offset ``at`` (the number of separators ``seps`` before it), -1 where the
    segment holds more than ``cap`` value-like tokens (``sizes``, of :func:`segment_sizes`)."""
    result: np.ndarray = _segments(seps, at, sizes, int(cap))
    return result


def _keys_py(
    buf: np.ndarray,
    view: np.ndarray,
    rs: np.ndarray,
    re_: np.ndarray,
    nl: np.ndarray,
    t: np.ndarray,
    lanes: np.ndarray,
    mix: np.ndarray,
    byte_mask: np.ndarray,
    max_word: int,
) -> np.ndarray:
    n = len(t)
    nr = len(rs)
    start = np.empty(n, dtype=np.int64)
    length = np.empty(n, dtype=np.int64)
    at, order = _radix_sort(t.copy(), np.arange(n, dtype=np.int64))
    lines = 0  # newlines before the token (its offset's order: this only moves forward)
    line_run = 0  # runs starting before its line
    upto = 0  # runs starting at or before the token
    for k in range(n):
        x = at[k]
        i = order[k]
        p = x - 1
        if buf[p] == 34 or buf[p] == 39:
            p -= 1
        if buf[p] == 32:
            p -= 1
        kend = p - (1 if buf[p - 1] == 34 or buf[p - 1] == 39 else 0)
        while upto < nr and rs[upto] <= x:
            upto += 1
        r = upto  # runs starting at or before kend - 1, a few bytes before the token
        while r > 0 and rs[r - 1] > kend - 1:
            r -= 1
        r -= 1
        if buf[p] == 58 and r >= 0 and re_[r] == kend:  # a key before ':'
            key = r
        else:  # the first run of the line
            while lines < len(nl) and nl[lines] < x:
                lines += 1
            line_start = nl[lines - 1] + 1 if lines > 0 else 0
            while line_run < nr and rs[line_run] < line_start:
                line_run += 1
            key = min(line_run, nr - 1)
        start[i] = rs[key]
        length[i] = min(max(re_[key] - rs[key], 1), max_word)
    h = np.empty(n, dtype=np.uint64)
    _words(view, start, length, lanes[0], lanes[1], mix, byte_mask, h)
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        out[i] = np.int64(h[i] >> np.uint64(1))
    return out


_keys = _jit(_keys_py)


def keys(
    buf: np.ndarray, runs: tuple[np.ndarray, np.ndarray], newlines: np.ndarray, t: np.ndarray, lanes: np.ndarray
) -> np.ndarray:
    """The ``key`` layout's record of the tokens at offsets ``t`` (see
    :meth:`paitient.rules.edm.records.Layout._key`): ``runs`` are the text's runs of value bytes (at least
    one), ``lanes`` the two key lanes of the hash."""
    result: np.ndarray = _keys(buf, word_view(buf), runs[0], runs[1], newlines, t, lanes, _MIX, _BYTE_MASK, MAX_WORD)
    return result


def _places_py(rs: np.ndarray, seps: np.ndarray, blank: np.ndarray, t: np.ndarray, min_columns: int) -> np.ndarray:
    nr = len(rs)
    ns = len(seps)
    n = len(t)
    # the tokens in the order of their offsets, and pointers that only move forward: the separators, runs
    # and blank lines before each token
    at, order = _radix_sort(t.copy(), np.arange(n, dtype=np.int64))
    out = np.empty(n, dtype=np.int64)
    cont = 0  # separators before the token
    first = 0  # the first run of its line or list
    last_end = 0  # runs before the separator that ends it
    r = 0  # runs starting at or before the token
    para = 0  # blank lines before it
    for k in range(n):
        x = at[k]
        moved = k == 0
        while cont < ns and seps[cont] < x:
            cont += 1
            moved = True
        if moved:
            first = np.searchsorted(rs, seps[cont - 1]) if cont > 0 else 0
            last_end = np.searchsorted(rs, seps[cont]) if cont < ns else nr
        while r < nr and rs[r] <= x:
            r += 1
        while para < len(blank) and blank[para] < x:
            para += 1
        last = last_end - 1
        if last - first + 1 >= min_columns:
            out[order[k]] = para * (1 << 32) + (last - (r - 1))
        else:
            out[order[k]] = -1
    return out


_places = _jit(_places_py)


def places(rs: np.ndarray, seps: np.ndarray, blank: np.ndarray, t: np.ndarray, min_columns: int) -> np.ndarray:
    """The ``position`` layout's record of the tokens at offsets ``t`` (see
    :meth:`paitient.rules.edm.records.Layout._position`): ``rs`` the starts of the runs of value bytes (at
    least one), ``seps`` the ends of lines and lists, ``blank`` the blank lines' newlines."""
    result: np.ndarray = _places(rs, seps, blank, t, int(min_columns))
    return result


def _grow_py(out: np.ndarray, count: int) -> np.ndarray:
    """A copy of the first ``count`` items of ``out`` in twice the room."""
    grown = np.empty(2 * len(out), dtype=np.int64)
    grown[:count] = out[:count]
    return grown


_grow = _jit(_grow_py)


_LINE, _PLACE, _BRACE, _NEWLINE, _BACKSLASH, _LESS = 1, 2, 4, 8, 16, 32
_SEPARATOR_BYTES = np.zeros(256, dtype=np.uint8)
"""Per byte, the layouts it separates (or the checks of the bytes after it it needs)."""
for _byte, _flags in (
    (10, _LINE | _PLACE | _NEWLINE),
    (13, _LINE | _PLACE),
    (93, _LINE | _PLACE | _BRACE),
    (125, _LINE | _BRACE),
    (91, _PLACE | _BRACE),
    (123, _BRACE),
    (92, _BACKSLASH),
    (60, _LESS),
):
    _SEPARATOR_BYTES[_byte] = _flags


def _all_separators_py(buf: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n = len(buf)
    line = np.empty(64, dtype=np.int64)
    brace = np.empty(64, dtype=np.int64)
    place = np.empty(64, dtype=np.int64)
    nl = np.empty(64, dtype=np.int64)
    nline = nbrace = nplace = nnl = 0
    for i in range(n):
        flags = table[buf[i]]
        if flags == 0:
            continue  # most bytes
        if flags & 16:  # a literal newline: a backslash and n
            flags = 3 if i + 1 < n and buf[i + 1] == 110 else 0
        elif flags & 32:  # </tr>, any case
            tr = (
                i + 4 < n
                and buf[i + 1] == 47
                and (buf[i + 2] | 32) == 116
                and (buf[i + 3] | 32) == 114
                and buf[i + 4] == 62
            )
            flags = 1 if tr else 0
        if flags & 1:
            if nline == len(line):
                line = _grow(line, nline)
            line[nline] = i
            nline += 1
        if flags & 2:
            if nplace == len(place):
                place = _grow(place, nplace)
            place[nplace] = i
            nplace += 1
        if flags & 4:
            if nbrace == len(brace):
                brace = _grow(brace, nbrace)
            brace[nbrace] = i
            nbrace += 1
        if flags & 8:
            if nnl == len(nl):
                nl = _grow(nl, nnl)
            nl[nnl] = i
            nnl += 1
    return line[:nline].copy(), brace[:nbrace].copy(), place[:nplace].copy(), nl[:nnl].copy()


_all_separators = _jit(_all_separators_py)


def all_separators(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """In one pass over ``buf`` (uint8), the ascending offsets of the separators of the ``line`` layout
    (newlines, returns, ``}``, ``]``, literal newlines, ``</tr>`` in any case), of the ``brace`` layout
    (``{ } [ ]``) and of the ``position`` layout (newlines, returns, ``[``, ``]``, literal newlines), and of
    the newlines."""
    line, brace, place, nl = _all_separators(buf, _SEPARATOR_BYTES)
    return line, brace, place, nl


def _merged_starts_py(start: np.ndarray, words: int, vl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(start)
    ascending = True
    for t in range(1, n):
        if t != words and start[t] < start[t - 1]:
            ascending = False
            break
    if not ascending:  # not two ascending runs: sort
        chosen = np.empty(n, dtype=np.int64)
        m = 0
        for t in range(n):
            if vl[t]:
                chosen[m] = start[t]
                m += 1
        return np.unique(start), np.sort(chosen[:m])
    distinct = np.empty(n, dtype=np.int64)
    values = np.empty(n, dtype=np.int64)
    nd = nv = 0
    i, j = 0, words
    last = np.int64(-1)
    past = np.int64(1) << 62  # after every offset: an exhausted run is never taken
    while i < words or j < n:
        # without a branch on which run the next offset comes from, which the CPU could not predict: every
        # offset is written, and only a new one (a value-like one) moves on
        a = start[i] if i < words else past
        b = start[j] if j < n else past
        word = a <= b
        k = i if word else j
        x = a if word else b
        i += 1 if word else 0
        j += 0 if word else 1
        distinct[nd] = x
        nd += 1 if x != last else 0
        last = x
        values[nv] = x
        nv += 1 if vl[k] else 0
    return distinct[:nd].copy(), values[:nv].copy()


_merged_starts = _jit(_merged_starts_py)


def merged_starts(start: np.ndarray, words: int, vl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(The distinct offsets of ``start``, ascending; the offsets of the tokens set in ``vl``, ascending, each
    as often as it occurs), merging the first ``words`` and the rest, which each ascend as the tokenizer gives
    them (any order is sorted, more slowly)."""
    distinct, values = _merged_starts(start.astype(np.int64, copy=False), int(words), vl)
    return distinct, values


def _windows_py(ordinal: np.ndarray, row: np.ndarray, col: np.ndarray, window: int, min_columns: int) -> np.ndarray:
    n = len(row)
    keys = np.empty(n, dtype=np.int64)
    for k in range(n):
        keys[k] = (row[k] << np.int64(40)) | (ordinal[k] << np.int64(10)) | col[k]
    keys = _radix_sort(keys, np.empty(n, dtype=np.int64))[0]
    # runs of one (row, column) in the order of (row, place)
    rr = np.empty(n, dtype=np.int64)
    cc = np.empty(n, dtype=np.int64)
    first = np.empty(n, dtype=np.int64)
    last = np.empty(n, dtype=np.int64)
    m = 0
    for k in range(n):
        r = keys[k] >> np.int64(40)
        c = keys[k] & np.int64(1023)
        o = (keys[k] >> np.int64(10)) & np.int64((1 << 30) - 1)
        if m == 0 or r != rr[m - 1] or c != cc[m - 1]:
            rr[m] = r
            cc[m] = c
            first[m] = o
            m += 1
        last[m - 1] = o
    out = np.empty(max(m, 1), dtype=np.int64)
    found = 0
    span = min_columns - 1
    for i in range(m - span):
        if rr[i] == rr[i + span] and cc[i] != cc[i + span] and first[i + span] - last[i] < window:
            out[found] = rr[i]
            found += 1
    rows: np.ndarray = _distinct_sorted(out[:found].copy())
    return rows


_windows = _jit(_windows_py)


def windows(ordinal: np.ndarray, row: np.ndarray, col: np.ndarray, window: int, min_columns: int) -> np.ndarray:
    """Sorted unique rows with hits of ``min_columns`` distinct columns among ``window`` consecutive tokens,
    as :func:`paitient.rules.edm.records.rows_in_windows_arrays` finds them (``row`` < 2**23, ``ordinal``
    < 2**30)."""
    result: np.ndarray = _windows(
        ordinal.astype(np.int64, copy=False),
        row.astype(np.int64, copy=False),
        col.astype(np.int64, copy=False),
        int(window),
        int(min_columns),
    )
    return result


def warm_up() -> None:
    """Load (or compile) every compiled function of the records' counting, on hits that take each path."""
    rec = np.array([0, 0, 0, 0, 1, -1], dtype=np.int64)
    tok = np.array([5, 6, 7, 8, 9, 10], dtype=np.int64)
    row = np.array([1, 1, 1, 2, 2, 3], dtype=np.int64)
    col = np.array([0, 1, 2, 0, 1, 2], dtype=np.int64)
    for pooled in (False, True):
        at, _ = kept(rec, 2, tok, row, col, 4, 1, 6, pooled, 3)
        revealed(rec, 2, row, col, at, (rec, tok, col), np.array([False, pooled]), 4, 4, 3)
    buf = np.frombuffer(b"\x00\x00ab-1 2019-03-04 Post-menopausal 1234 x\n\x00\x00", dtype=np.uint8)
    table = np.zeros(256, dtype=np.bool_)
    table[[10, 32, 45]] = True
    positions(buf, table)
    class_runs(buf, ~table)
    at = np.array([2, 7, 18, 34], dtype=np.int64)
    value_like(buf.copy(), at, np.array([4, 10, 15, 4]), 1)  # a text's buffer is writable
    padded = np.concatenate((np.zeros(16, np.uint8), buf, np.zeros(80, np.uint8)))
    runs = class_runs(padded, ~table)
    newlines = positions(padded, table)
    segments(newlines, at + 16, segment_sizes(newlines, at + 16), 3)
    dense(np.array([5, -1, 3, 5], dtype=np.int64))
    windows(at, np.array([1, 1, 1, 2]), np.array([0, 1, 2, 0]), 12, 3)
    all_separators(padded)
    merged_starts(at, 2, np.ones(len(at), dtype=np.bool_))
    keys(padded, runs, newlines, at + 16, np.arange(2, dtype=np.uint64))
    places(runs[0], newlines, newlines[:1], at + 16, 3)
    # every layout in one call: three tokens of one row, in one line, one key's record, one window
    n = 3
    rid = np.zeros((5, n), dtype=np.int64)
    size = np.zeros((5, n), dtype=np.int64)
    start = np.array([2, 9, 5], dtype=np.int64)
    vl = np.ones(n, dtype=np.bool_)
    segment_row(start, vl, newlines, True, 1 << 62, rid[0], size[0])
    segment_row(start, vl, start[:0], False, 1 << 62, rid[4], size[4])
    pooled_row(np.array([7, 7, -1], dtype=np.int64), vl, 1 << 62, rid[1], size[1])
    ready = np.array([True, False, False, True, True])
    found = (rid, size, np.ones(5, dtype=np.int64), ~ready, ordinals(start, 2))

    def records(layout: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        ready[1:3] |= layout > 0
        return (*found, ready)

    hits = (np.arange(n, dtype=np.int64), np.ones(n, dtype=np.int64), np.arange(n, dtype=np.int64))
    all_layouts(records, hits, np.zeros(2, dtype=np.bool_), np.ones(2, dtype=np.bool_), 2, 20, 0, 12, 4, 3)
