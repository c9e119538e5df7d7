"""The index lookup of a scan, compiled (numba): each fingerprint's bucket walked once, entry by entry.

:meth:`paitient.rules.edm.index.EDMIndex.lookup_arrays` keeps the lookup in whole-array numpy, the
reference: it walks every query's bucket a few entries at a time in rounds, then expands what is left.
:func:`lookup` finds the same hits in one pass over the queries: for each, the bucket of its top bits in
the directory, and in it every entry whose stored fingerprint bits are the query's. Its hits come in the
order of the queries, and within one query in the order of the bucket; the reference's come round by
round. The set is the same, and nothing downstream depends on the order: the scan sorts, counts or marks
what it is given (see :meth:`paitient.rules.edm.match.Scan.rows`).

Compiled at first use, the machine code kept for later processes (:func:`paitient.rules.edm.compiled._jit`);
:func:`warm_up` loads every compiled function, so that a service can pay for that at start. Constants of
other modules go in as arguments: numba freezes a global into the machine code it keeps, and would not see
it change.
"""

from __future__ import annotations

import numpy as np

from paitient.rules.edm.compiled import _jit


def _grow_py(a: np.ndarray, size: int) -> np.ndarray:
    """``a`` in a new array twice as long, its first ``size`` items kept."""
    grown = np.empty(2 * len(a), dtype=a.dtype)
    grown[:size] = a[:size]
    return grown


_grow = _jit(_grow_py)


def _walk_py(
    fps: np.ndarray,
    entries: np.ndarray,
    directory: np.ndarray,
    dir_bits: int,
    fp_shift: int,
    i: int,
    count: int,
    query: np.ndarray,
    found: np.ndarray,
) -> tuple[int, int]:
    """Hits of the queries from the ``i``-th on, written from ``count`` on, up to the first query whose bucket
    would not fit in what is left of ``query`` and ``found``: (that query, the hits written)."""
    bucket_shift = np.uint64(64 - dir_bits)
    bits = np.uint64(dir_bits)
    shift = np.uint64(fp_shift)
    n = len(fps)
    room = len(query)
    while i < n:
        fp = fps[i]
        bucket = np.int64(fp >> bucket_shift)
        lo = np.int64(directory[bucket])
        hi = np.int64(directory[bucket + 1])
        if count + hi - lo > room:
            return i, count
        want = (fp << bits) >> shift
        for at in range(lo, hi):
            e = entries[at]
            if (e >> shift) == want:
                query[count] = i
                found[count] = e
                count += 1
        i += 1
    return i, count


_walk = _jit(_walk_py)


def _lookup_py(
    fps: np.ndarray, entries: np.ndarray, directory: np.ndarray, dir_bits: int, fp_shift: int
) -> tuple[np.ndarray, np.ndarray]:
    # the arrays grow outside the walk: a loop that may replace an array it writes to runs many times slower
    n = len(fps)
    query = np.empty(n + 64, dtype=np.int64)
    found = np.empty(n + 64, dtype=np.uint64)
    i, count = 0, 0
    while True:
        i, count = _walk(fps, entries, directory, dir_bits, fp_shift, i, count, query, found)
        if i == n:
            return query[:count], found[:count]
        query = _grow(query, count)
        found = _grow(found, count)


_lookup = _jit(_lookup_py)


def lookup(
    fps: np.ndarray, entries: np.ndarray, directory: np.ndarray, dir_bits: int, fp_shift: int
) -> tuple[np.ndarray, np.ndarray]:
    """(query number, entry) of every entry of the index (``entries``, ``directory``, the directory's
    ``dir_bits``) whose fingerprint bits (the entry's top ``64 - fp_shift``) are those of a query in
    ``fps`` (uint64) below its top ``dir_bits``; queries in order, each one's entries in bucket order."""
    query, found = _lookup(fps, entries, directory, int(dir_bits), int(fp_shift))
    return query, found


def _sift_py(
    query: np.ndarray,
    row: np.ndarray,
    col: np.ndarray,
    primary: np.ndarray,
    exact: np.ndarray,
    exact_only: np.ndarray,
    words: int,
    token: np.ndarray,
    nrows: int,
    min_columns: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n = len(query)
    revealed = np.zeros(nrows, dtype=np.bool_)
    candidates = np.zeros(nrows, dtype=np.bool_)
    # per row, the first min_columns - 1 distinct columns among its hits (column + 1; 0: none yet); only the
    # rows hit are cleared, so that a short text costs as little against a large index as against a small one
    seen = np.empty((nrows, max(min_columns - 1, 1)), dtype=np.int32)
    for i in range(n):
        seen[row[i]] = 0
    tok = np.empty(n, dtype=np.int64)
    rows = np.empty(n, dtype=np.int64)
    cols = np.empty(n, dtype=np.int64)
    kept = 0
    for i in range(n):
        q = query[i]
        if (exact_only[q] and not exact[i]) or (q >= words and primary[i]):
            continue
        r = row[i]
        if primary[i]:
            revealed[r] = True
            continue
        c = col[i]
        tok[kept] = token[q]
        rows[kept] = r
        cols[kept] = c
        kept += 1
        if min_columns <= 1:
            candidates[r] = True
            continue
        new = True
        for k in range(min_columns - 1):
            if seen[r, k] == c + 1:
                new = False
                break
            if seen[r, k] == 0:
                seen[r, k] = c + 1
                new = False
                break
        if new:  # a column other than the min_columns - 1 already seen
            candidates[r] = True
    return revealed, candidates, tok[:kept], rows[:kept], cols[:kept]


_sift = _jit(_sift_py)


def sift(
    query: np.ndarray,
    row: np.ndarray,
    col: np.ndarray,
    primary: np.ndarray,
    exact: np.ndarray,
    exact_only: np.ndarray,
    words: int,
    token: np.ndarray,
    nrows: int,
    min_columns: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The hits (``query``, ``row``, ``col``, ``primary``, ``exact``) that count, sorted into what they reveal
    (see :func:`paitient.rules.edm.match.sift`): a hit of an ``exact_only`` query on a rounded entry, and a
    number's (a query from ``words`` on) on a primary entry, do not count; (rows revealed by a primary hit, as
    a mask over ``nrows`` rows; rows with hits of at least ``min_columns`` columns, a mask too; the token
    (``token[query]``), row and column of every other hit, in the order of the hits)."""
    revealed, candidates, tok, rows, cols = _sift(
        query, row, col, primary, exact, exact_only, int(words), token, int(nrows), int(min_columns)
    )
    return revealed, candidates, tok, rows, cols


def warm_up() -> None:
    """Load (or compile) every compiled function of the scan's lookups, on inputs that take each path."""
    # one bucket of 80 equal entries: more hits than the first arrays hold
    lookup(np.zeros(1, dtype=np.uint64), np.zeros(80, dtype=np.uint64), np.array([0, 80, 80], np.uint32), 1, 38)
    one = np.zeros(1, dtype=np.int64)
    sift(one, one, one, np.ones(1, np.bool_), one == 0, one == 1, 1, one, 1, 3)
