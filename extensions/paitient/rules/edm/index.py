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

from paitient.rules.edm import columns, compiled_match
from paitient.rules.edm.hashing import Keyed

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
_LOOP = 4  # lookup_arrays walks a bucket entry by entry this far, then expands what is left in one go
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
            kind = columns.kind(col.type)
            if kind == "number":
                fps, rws, exact, ncells, used = columns.numbers(keyed, columns.floats(col), thr)
                tiers |= used
            elif kind in ("text", "date"):
                fps, rws, ncells = columns.words(keyed, col, thr, primary=name in primary, date=kind == "date")
                exact = np.ones(len(fps), dtype=bool)
                if kind == "date":  # also as the epoch numbers to_json() and timestamps print, whole
                    for unit in EPOCH_UNITS_MS:
                        efps, erws, eex, _, used = columns.numbers(
                            keyed, columns.epoch_ms(col) / unit, thr, rounded=False
                        )
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
        packed = (bucket << np.uint64(32)) | np.arange(len(fps), dtype=np.uint64)
        packed.sort()
        at = (packed & np.uint64(0xFFFFFFFF)).astype(np.int64)
        entries = ((fps[at] << np.uint64(bits)) >> _FP_SHIFT << _FP_SHIFT) | tags[at]
        directory = np.zeros((1 << bits) + 1, dtype=np.int64)  # where each bucket's entries begin
        np.cumsum(np.bincount(bucket.astype(np.int64), minlength=1 << bits), out=directory[1:])
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
        """Every entry whose fingerprint is one of ``fps`` (uint64): query by query, each one's entries in the
        order of its bucket (:func:`paitient.rules.edm.compiled_match.lookup`)."""
        q, e = compiled_match.lookup(fps, self.entries, self.dir, self.dir_bits, int(_FP_SHIFT))
        row, col, primary, exact = compiled_match.decoded(
            e, int(_ROW_SHIFT), int(_ROW_MASK), int(_COL_MASK), int(_PRIMARY), int(_EXACT)
        )
        return Hits(query=q, row=row, col=col, primary=primary, exact=exact)

    def lookup_arrays(self, fps: np.ndarray) -> Hits:
        """:meth:`lookup` in whole-array numpy, the reference: the same hits, in another order (round by round
        over the buckets' first entries, then the rest of the long buckets)."""
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
        return _hits(q, e)

    def select(self, hits: Hits, keep: np.ndarray) -> Hits:
        return Hits(hits.query[keep], hits.row[keep], hits.col[keep], hits.primary[keep], hits.exact[keep])


def _hits(query: np.ndarray, entries: np.ndarray) -> Hits:
    """The hits of matched ``entries`` (uint64), each of query number ``query``."""
    return Hits(
        query=query,
        row=((entries >> _ROW_SHIFT) & _ROW_MASK).astype(np.int64),
        col=(entries & _COL_MASK).astype(np.int64),
        primary=(entries & _PRIMARY) != 0,
        exact=(entries & _EXACT) != 0,
    )
