"""A table's columns as fingerprints of their distinctive values, with the rows that hold them.

Numbers (:func:`numbers`): each column is sorted once by its values at 6 significant digits, so rows
sharing a value are neighbours and every count is a run length; natural precision and the coarser
tiers come from the 6-digit mantissa by integer division. Text and dates (:func:`words`): each distinct
value is split into words once, and the words' row counts come from the values' counts.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from paitient.rules.edm import numbers as nb
from paitient.rules.edm.hashing import FRONT, PAD, Keyed, word_view
from paitient.rules.edm.tokens import lowered, word_runs


def kind(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "text"
    if pa.types.is_date(t) or pa.types.is_timestamp(t):
        return "date"
    return "other"


def _plain(col: pa.ChunkedArray) -> pa.Array:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    return arr


def floats(col: pa.ChunkedArray) -> np.ndarray:
    arr = _plain(col)
    if not pa.types.is_floating(arr.type):
        arr = arr.cast(pa.float64(), safe=False)
    result: np.ndarray = arr.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    return result


def epoch_ms(col: pa.ChunkedArray) -> np.ndarray:
    """Dates and timestamps as milliseconds since 1970 (float64, NaN where missing)."""
    arr = _plain(col)
    if pa.types.is_date(arr.type):
        arr = arr.cast(pa.date32()).cast(pa.int32()).cast(pa.float64())
        days: np.ndarray = arr.to_numpy(zero_copy_only=False)
        return days * 86_400_000.0
    arr = arr.cast(pa.timestamp("ms")).cast(pa.int64()).cast(pa.float64())
    ms: np.ndarray = arr.to_numpy(zero_copy_only=False)
    return ms


def _run_counts(key: np.ndarray) -> np.ndarray:
    """For a sorted key, how many elements share each element's key."""
    change = np.flatnonzero(key[1:] != key[:-1]) + 1
    size = np.diff(np.concatenate(([0], change, [len(key)])))
    return np.repeat(size, size)


def numbers(
    keyed: Keyed, x: np.ndarray, thr: int, *, rounded: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, set[int]]:
    """Fingerprints, rows and exact flags of a numeric column's distinctive values; cells indexed, tiers used.

    Exact entries: the value at its natural precision, where at most ``thr`` rows have that value.
    Rounded entries (unless ``rounded`` is off, as for epoch numbers, which print whole): the value
    at each tier below its natural precision, from the coarsest where at most ``thr`` rows share it.
    Every tier is derived from the value's 6-digit mantissa by integer rounding; a remainder of exactly
    one half (the 6 digits may themselves be rounded) gives both neighbours.
    """
    x = np.abs(x)
    with np.errstate(invalid="ignore"):
        valid = np.flatnonzero(np.isfinite(x) & (x > 0))
    empty = np.zeros(0, np.uint64)
    if not len(valid):
        return empty, empty, empty.astype(bool), 0, set()
    xv = x[valid]
    lead, s6 = nb.lead_and_six(xv)
    m6 = np.rint(s6)
    close = np.abs(s6 - m6) <= s6 * nb.STORED_NOISE  # the value has at most 6 digits
    e6 = lead - 5
    top = m6 >= 1_000_000  # 999999.6 rounds up a decade
    if top.any():
        m6, e6 = np.where(top, 100_000.0, m6), e6 + top
    # sort (value at 6 digits, at most 6 digits?, position) packed in one uint64; then equal values are
    # neighbours, and the value, the flag and the position come back out of the key
    key = (e6 + 1024).astype(np.uint64) << np.uint64(20) | m6.astype(np.uint64)
    key = key << np.uint64(28) | close.astype(np.uint64) << np.uint64(27) | np.arange(len(xv), dtype=np.uint64)
    key.sort()
    value_key = key >> np.uint64(28)
    pos = (key & np.uint64((1 << 27) - 1)).astype(np.int64)
    order = pos if len(valid) == len(x) else valid[pos]
    m6 = (value_key & np.uint64((1 << 20) - 1)).astype(np.int32)  # int32: division by a constant is fast
    e6 = (value_key >> np.uint64(20)).astype(np.int64) - 1024
    close = ((key >> np.uint64(27)) & np.uint64(1)).astype(bool)
    natural = np.full(len(order), 6, dtype=np.int64)
    if close.any():
        for t, div in ((5, 10), (4, 100), (3, 1000)):
            natural[close & (m6 - m6 // div * div == 0)] = t
    exact_ok = _run_counts(value_key) <= thr  # rows with this very value
    tiers: dict[int, tuple[np.ndarray, ...]] = {}
    coarsest = np.zeros(len(order), dtype=np.int64)
    if rounded:
        # fine to coarse: a tier where no value is distinctive has no coarser one where any is
        for t in nb.TIERS[-2::-1]:
            below = natural > t
            if not below.any():
                continue
            div = 10 ** (6 - t)
            q = m6 // div
            r2 = (m6 - q * div) * 2
            m = q + (r2 >= div)
            e = e6 + (6 - t)
            over = m >= 10**t
            if over.any():
                m, e = np.where(over, 10 ** (t - 1), m), e + over
            tie = r2 == div
            tiers[t] = (m, e, tie, q, e6 + (6 - t))
            distinct = below & (_run_counts(e * (1 << 21) + m.astype(np.int64)) <= thr)
            if not distinct.any():
                break
            coarsest[distinct] = t
    fps, rows, exact, used = [], [], [], set()

    def add(t: int, sel: np.ndarray, m: np.ndarray, e: np.ndarray, is_exact: bool) -> None:
        fps.append(keyed.numbers(nb.pack(t, m, e)))
        rows.append(order[sel])
        exact.append(np.full(len(sel), is_exact))
        used.add(t)

    for t in nb.TIERS:
        sel = np.flatnonzero((natural == t) & exact_ok)
        if len(sel):
            add(t, sel, m6[sel] // 10 ** (6 - t), e6[sel] + (6 - t), True)
        if t not in tiers:
            continue
        sel = np.flatnonzero((coarsest > 0) & (coarsest <= t) & (natural > t))
        if not len(sel):
            continue
        m, e, tie, q, eq = (a[sel] for a in tiers[t])
        add(t, sel, m, e, False)
        twin = np.flatnonzero(tie)
        if len(twin):  # on the midpoint: the neighbour below (the 6 digits may be rounded up)
            add(t, sel[twin], q[twin], eq[twin], False)
    if not fps:
        return empty, empty, empty.astype(bool), 0, set()
    cells = int(((coarsest > 0) | ((natural >= 3) & exact_ok)).sum())
    return np.concatenate(fps), np.concatenate(rows), np.concatenate(exact), cells, used


def _distinct(col: pa.ChunkedArray, date: bool) -> tuple[np.ndarray, pa.Array]:
    """Row codes (int64, -1 for null) and the distinct values as strings (dates as ISO)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if date and pa.types.is_timestamp(arr.type):
        arr = arr.cast(pa.date32())
    if not pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_encode()
    values = arr.dictionary
    if date:
        if pa.types.is_timestamp(values.type):
            values = values.cast(pa.date32())
        values = values.cast(pa.string())
    elif not pa.types.is_string(values.type):
        values = values.cast(pa.large_string()).cast(pa.string())
    codes = arr.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, values


def _joined(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The values' UTF-8 bytes, each followed by a NUL, between FRONT and PAD zero bytes (uint8), and
    each value's start offset."""
    values = pc.fill_null(values, "")
    bufs = values.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32)[values.offset : values.offset + len(values) + 1]
    offsets = offsets.astype(np.int64)
    lengths = np.diff(offsets)
    starts = FRONT + np.cumsum(lengths + 1) - (lengths + 1)
    buf = np.zeros(FRONT + int(lengths.sum()) + len(lengths) + PAD, dtype=np.uint8)
    if bufs[2] is not None and offsets[-1] > offsets[0]:
        data = np.frombuffer(bufs[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
        dst = np.arange(offsets[0], offsets[-1]) + np.repeat(starts - offsets[:-1], lengths)
        buf[dst] = data
    return buf, starts


def words(
    keyed: Keyed, col: pa.ChunkedArray, thr: int, *, primary: bool, date: bool
) -> tuple[np.ndarray, np.ndarray, int]:
    """Fingerprints and rows of a text or date column's distinctive words, and the cells indexed."""
    empty = np.zeros(0, np.uint64)
    codes, values = _distinct(col, date)
    if not len(values):
        return empty, empty, 0
    buf, vstart = _joined(values)
    ws, wl = word_runs(buf)
    if not len(ws):
        return empty, empty, 0
    fps = keyed.words(word_view(lowered(buf)), ws, wl)
    value = np.searchsorted(vstart, ws, "right") - 1
    # one entry per (value, word), however often the word stands in the value
    order = np.lexsort((fps, value))
    value, fps = value[order], fps[order]
    dup = np.zeros(len(fps), dtype=bool)
    dup[1:] = (value[1:] == value[:-1]) & (fps[1:] == fps[:-1])
    value, fps = value[~dup], fps[~dup]
    present = codes[codes >= 0]
    per_value = np.bincount(present, minlength=len(values))
    if not primary:
        uniq, inv = np.unique(fps, return_inverse=True)
        rows_with = np.bincount(inv, weights=per_value[value], minlength=len(uniq))
        keep = (rows_with[inv] <= thr) & (per_value[value] > 0)
        value, fps = value[keep], fps[keep]
    if not len(value):
        return empty, empty, 0
    by_value = np.argsort(codes, kind="stable")
    first = np.searchsorted(codes[by_value], np.arange(len(values)))
    n = per_value[value]
    at = np.repeat(first[value] - (np.cumsum(n) - n), n) + np.arange(int(n.sum()))
    rows = by_value[at]
    return np.repeat(fps, n), rows, int(per_value[np.unique(value)].sum())
