"""The index of one dataset version: keyed fingerprints of its distinctive values, and which row has each.

Every cell is normalised (numbers: :mod:`.numbers`; text and dates: the words of :mod:`.tokens`, dates
as ISO ``YYYY-MM-DD`` and as epoch numbers) and fingerprinted with the site's secret key. A number is
indexed exactly at its natural precision when at most ``threshold`` rows of its column have that very
value, and rounded at each tier below it from the coarsest at which at most ``threshold`` rows share the
rounding; a word when at most ``threshold`` rows of its column contain it. Values shared by more rows
(small integers, category labels, common dates in a large table) are not indexed: they do not tell
rows apart. Pseudonym columns are *primary*: their words are indexed whatever their frequency, and one
of them reveals every row that carries it.

Layout: one uint64 per entry, ``fingerprint bits (26) | row (27) | exact (1) | primary (1) | column (9)``,
grouped by the bucket of the fingerprint's top ``dir_bits`` bits, and a directory ``dir`` (uint32,
where each bucket's entries begin; a bucket per 2 to 4 entries). An entry holds the 26 fingerprint bits
that follow the directory's, so a lookup compares ``dir_bits + 26`` bits (36 or more) against each
entry of its bucket. About 9 bytes per entry; the header counts entries per column and the bytes per
indexed cell. Columns past the 512th share ids with earlier ones (which can only hide a row, never
reveal one); a version holds at most 2**27 (134 million) rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from paitient.rules.edm import numbers as nb
from paitient.rules.edm.hashing import FRONT, PAD, Keyed, word_view
from paitient.rules.edm.tokens import lowered, word_runs

FORMAT = 1
THRESHOLD = 3
"""A value shared by at most this many rows of its column is distinctive; one shared by more is not
indexed. Each lookup of a printed value fans out to the rows that share it, so the cost of a dump and
the chance of unrelated values meeting in one record both grow with it; large tables with values
printed to 4 digits are where a higher threshold would find more (see docs/egress.md)."""
EPOCH_UNITS_MS = (1,)
"""Dates are indexed as words (ISO) and as epoch numbers in these units of a millisecond (1: the
milliseconds ``to_json()`` prints by default)."""
MAX_ROWS = 1 << 27
COLUMN_BITS = 9
_FP_BITS = 26
_ROW_SHIFT = np.uint64(COLUMN_BITS + 2)
_FP_SHIFT = np.uint64(64 - _FP_BITS)
_ROW_MASK = np.uint64(MAX_ROWS - 1)
_COL_MASK = np.uint64((1 << COLUMN_BITS) - 1)
_PRIMARY = np.uint64(1 << COLUMN_BITS)
_EXACT = np.uint64(1 << (COLUMN_BITS + 1))
_LOOP = 4  # lookups walk a bucket entry by entry this far, then expand what is left in one go
ARRAYS = ("entries", "dir")


class IndexError_(ValueError):
    """The index cannot be built or used as asked; the message says why and what to do."""


@dataclass
class Hits:
    """Entries that matched queries: the query's number, the row, the column, whether the column is
    primary, and whether the entry holds the value exactly (words, numbers at their natural precision)."""

    query: np.ndarray
    row: np.ndarray
    col: np.ndarray
    primary: np.ndarray
    exact: np.ndarray


class EDMIndex:
    """Fingerprints of one dataset version's distinctive values; see the module docstring."""

    def __init__(self, header: dict[str, Any], arrays: Mapping[str, np.ndarray], keyed: Keyed):
        if header.get("format") != FORMAT:
            raise IndexError_(
                f"index format {header.get('format')!r} is not {FORMAT}; rebuild it (paitient datasets --reindex)"
            )
        if header.get("key_id") != keyed.key_id:
            raise IndexError_(
                "the index was built with another row-detection key; rebuild it with the current key "
                "(paitient datasets --reindex)"
            )
        entries, directory = arrays["entries"], arrays["dir"]
        bits = int(header["dir_bits"])
        if entries.dtype != np.uint64 or directory.dtype != np.uint32 or len(directory) != (1 << bits) + 1:
            raise IndexError_("the index arrays do not fit its header; rebuild it (paitient datasets --reindex)")
        self.header = header
        self.keyed = keyed
        self.entries = entries
        self.dir = directory
        self.dir_bits = bits
        self.rows = int(header["rows"])
        self.columns: list[str] = list(header["columns"])
        self.tiers = tuple(header["tiers"])

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def nbytes(self) -> int:
        return int(self.entries.nbytes + self.dir.nbytes)

    @property
    def bytes_per_entry(self) -> float:
        return self.nbytes / max(1, len(self.entries))

    @property
    def bytes_per_cell(self) -> float:
        """Bytes per indexed cell (a cell indexed at several tiers counts once)."""
        return self.nbytes / max(1, int(self.header["cells"]))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"entries": self.entries, "dir": self.dir}

    @classmethod
    def build(
        cls,
        table: pa.Table,
        *,
        key: bytes | Keyed,
        primary_columns: Iterable[str] = (),
        threshold: int | None = None,
    ) -> EDMIndex:
        """Index ``table`` (row ids are its row positions) with ``key``; ``primary_columns`` are pseudonyms."""
        keyed = key if isinstance(key, Keyed) else Keyed(key)
        primary = set(primary_columns)
        missing = primary - set(table.column_names)
        if missing:
            raise IndexError_(f"primary column(s) {sorted(missing)} are not in the table; name columns it has")
        rows = table.num_rows
        if rows > MAX_ROWS or table.num_columns * rows >= 1 << 32:
            raise IndexError_(
                f"a dataset version of more than {MAX_ROWS:,} rows or 2**32 cells cannot be indexed; split it"
            )
        thr = THRESHOLD if threshold is None else int(threshold)
        if thr < 1:
            raise IndexError_(f"threshold = {thr}: it must be at least 1 row")
        fps_parts: list[np.ndarray] = []
        tag_parts: list[np.ndarray] = []
        per_column: dict[str, int] = {}
        cells = 0
        tiers: set[int] = set()
        for j, name in enumerate(table.column_names):
            col = table.column(name)
            kind = _kind(col.type)
            if kind == "number":
                fps, rws, exact, ncells, used = _numbers(keyed, _floats(col), thr)
                tiers |= used
            elif kind in ("text", "date"):
                fps, rws, ncells = _words(keyed, col, thr, primary=name in primary, date=kind == "date")
                exact = np.ones(len(fps), dtype=bool)
                if kind == "date":  # also as the epoch numbers to_json() and timestamps print, whole
                    for unit in EPOCH_UNITS_MS:
                        efps, erws, eex, _, used = _numbers(keyed, _epoch_ms(col) / unit, thr, rounded=False)
                        fps, rws, exact = (np.concatenate(p) for p in ((fps, efps), (rws, erws), (exact, eex)))
                        tiers |= used
            else:
                continue
            tag = np.uint64(j % (1 << COLUMN_BITS)) | (_PRIMARY if name in primary else np.uint64(0))
            fps_parts.append(fps)
            tag_parts.append((rws.astype(np.uint64) << _ROW_SHIFT) | tag | (exact.astype(np.uint64) * _EXACT))
            per_column[name] = len(fps)
            cells += ncells
        fps = np.concatenate(fps_parts) if fps_parts else np.zeros(0, np.uint64)
        tags = np.concatenate(tag_parts) if tag_parts else np.zeros(0, np.uint64)
        if len(fps) >= 1 << 32:
            raise IndexError_(f"{len(fps):,} index entries are more than one index holds; split the dataset")
        bits = int(min(31, max(10, math.ceil(math.log2(max(2, len(fps)))) - 2)))
        bucket = fps >> np.uint64(64 - bits)
        # entries grouped by bucket (their order within one does not matter): a packed sort
        key = (bucket << np.uint64(32)) | np.arange(len(fps), dtype=np.uint64)
        key.sort()
        at = (key & np.uint64(0xFFFFFFFF)).astype(np.int64)
        entries = ((fps[at] << np.uint64(bits)) >> _FP_SHIFT << _FP_SHIFT) | tags[at]
        directory = np.searchsorted(key >> np.uint64(32), np.arange((1 << bits) + 1, dtype=np.uint64))
        arrays = {"entries": entries, "dir": directory.astype(np.uint32)}
        header = {
            "format": FORMAT,
            "rows": rows,
            "columns": table.column_names,
            "primary": sorted(primary),
            "threshold": thr,
            "tiers": sorted(tiers),
            "entries": len(entries),
            "cells": cells,
            "entries_per_column": per_column,
            "dir_bits": bits,
            "key_id": keyed.key_id,
            "bytes": int(entries.nbytes + arrays["dir"].nbytes),
        }
        return cls(header, arrays, keyed)

    def lookup(self, fps: np.ndarray) -> Hits:
        """Every entry whose fingerprint is one of ``fps`` (uint64)."""
        shift = np.uint64(64 - self.dir_bits)
        bucket = (fps >> shift).astype(np.intp)
        pos = self.dir[bucket].astype(np.int64)
        end = self.dir[bucket + 1].astype(np.int64)
        want = (fps << np.uint64(self.dir_bits)) >> _FP_SHIFT
        active = np.flatnonzero(end > pos)
        pos, end, want = pos[active], end[active], want[active]
        found_q, found_e = [], []
        for _ in range(_LOOP):
            if not len(active):
                break
            e = self.entries[pos]
            have = e >> _FP_SHIFT
            same = have == want
            found_q.append(active[same])
            found_e.append(e[same])
            pos += 1
            more = np.flatnonzero(pos < end)
            active, pos, end, want = active[more], pos[more], end[more], want[more]
        if len(active):  # long buckets (a patient's many rows): expand the rest at once
            cnt = end - pos
            first = np.cumsum(cnt) - cnt
            at = np.repeat(pos - first, cnt) + np.arange(int(cnt.sum()))
            q = np.repeat(active, cnt)
            e = self.entries[at]
            same = (e >> _FP_SHIFT) == np.repeat(want, cnt)
            found_q.append(q[same])
            found_e.append(e[same])
        q = np.concatenate(found_q) if found_q else np.zeros(0, np.int64)
        e = np.concatenate(found_e) if found_e else np.zeros(0, np.uint64)
        return Hits(
            query=q,
            row=((e >> _ROW_SHIFT) & _ROW_MASK).astype(np.int64),
            col=(e & _COL_MASK).astype(np.int64),
            primary=(e & _PRIMARY) != 0,
            exact=(e & _EXACT) != 0,
        )

    def select(self, hits: Hits, keep: np.ndarray) -> Hits:
        return Hits(hits.query[keep], hits.row[keep], hits.col[keep], hits.primary[keep], hits.exact[keep])


def _kind(t: pa.DataType) -> str:
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


def _floats(col: pa.ChunkedArray) -> np.ndarray:
    arr = _plain(col)
    if not pa.types.is_floating(arr.type):
        arr = arr.cast(pa.float64(), safe=False)
    return arr.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def _epoch_ms(col: pa.ChunkedArray) -> np.ndarray:
    """Dates and timestamps as milliseconds since 1970 (float64, NaN where missing)."""
    arr = _plain(col)
    if pa.types.is_date(arr.type):
        arr = arr.cast(pa.date32()).cast(pa.int32()).cast(pa.float64())
        return arr.to_numpy(zero_copy_only=False) * 86_400_000.0
    arr = arr.cast(pa.timestamp("ms")).cast(pa.int64()).cast(pa.float64())
    return arr.to_numpy(zero_copy_only=False)


def _run_counts(key: np.ndarray) -> np.ndarray:
    """For a sorted key, how many elements share each element's key."""
    change = np.flatnonzero(key[1:] != key[:-1]) + 1
    size = np.diff(np.concatenate(([0], change, [len(key)])))
    return np.repeat(size, size)


def _numbers(
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
    tiers: dict[int, tuple] = {}
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


def _words(
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
