"""A table's columns as fingerprints of their distinctive values, with the rows that hold them.

Numbers (:func:`numbers`): each column is sorted once by its values at 6 significant digits, so rows
sharing a value are neighbours and every count is a run length; natural precision and the coarser
tiers come from the 6-digit mantissa by integer division, in one compiled pass (:mod:`.compiled`).
Text and dates (:func:`words`): each distinct value is split into words once, and the words' row counts
come from the values' counts.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from paitient.rules.edm import numbers as nb
from paitient.rules.edm.hashing import FRONT, PAD, Keyed, word_view
from paitient.rules.edm.tokens import dates_in_iso_order, lowered, word_runs


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


def number_key(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A numeric column's usable values (finite, nonzero; the sign ignored) as one sorted uint64 each, and
    where they stand in ``x``.

    The key packs the value at 6 significant digits (exponent + 1024 in the top bits, then the 6-digit
    mantissa), whether the value has at most 6 digits, and its position among the usable values: equal
    values are neighbours, and all of it comes back out of the key (:mod:`.compiled`).
    """
    x = np.abs(x)
    with np.errstate(invalid="ignore"):
        valid = np.flatnonzero(np.isfinite(x) & (x > 0))
    xv = x[valid]
    if not len(xv):
        return np.zeros(0, np.uint64), valid
    from paitient.rules.edm.compiled import sort_key  # the compiler loads with the first index built

    lead, s6 = nb.lead_and_six(xv)
    key = sort_key(lead, s6, nb.STORED_NOISE)
    key.sort()
    return key, valid


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
    from paitient.rules.edm.compiled import number_entries  # the compiler loads with the first index built

    key, valid = number_key(x)
    packed, pos, exact, cells, used = number_entries(key, thr, rounded=rounded)
    if not len(packed):
        empty = np.zeros(0, np.uint64)
        return empty, empty, empty.astype(bool), 0, set()
    return keyed.numbers(packed), pos if len(valid) == len(x) else valid[pos], exact, cells, used


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
    low = lowered(buf)
    dates_in_iso_order(low, ws, wl)  # a text cell "04.03.2019" is the date 2019-03-04, as on the output side
    fps = keyed.words(word_view(low), ws, wl)
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
    from paitient.rules.edm.compiled import rows_by_code  # the compiler loads with the first index built

    first, by_value = rows_by_code(codes, len(values))
    n = per_value[value]
    at = np.repeat(first[value] - (np.cumsum(n) - n), n) + np.arange(int(n.sum()))
    rows = by_value[at]
    return np.repeat(fps, n), rows, int(per_value[np.unique(value)].sum())
