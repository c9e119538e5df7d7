"""A scan's fingerprints, index lookups and sifting of hits, compiled (numba): one pass each, where the
whole-array references take a few dozen numpy operations.

- :func:`queries`: the fingerprints of a text's words and of its numbers at each precision to look up, as
  :func:`paitient.rules.edm.match._queries_arrays` computes them with :mod:`.numbers` and :mod:`.hashing`
  (the index side's code): the same floating-point operations on each value, in the same order, so the
  same bits, and the lookups in the same order;
- :func:`lookup`: for each query, the bucket of its top bits in the directory, and in it every entry whose
  stored fingerprint bits are the query's. :meth:`paitient.rules.edm.index.EDMIndex.lookup_arrays`, the
  reference, walks every bucket a few entries at a time in rounds, then expands what is left; the hits are
  the same, but they come here query by query (each one's in the order of its bucket), there round by
  round. Nothing downstream depends on the order: the scan marks, sorts or counts what it is given;
- :func:`sift`: drops the hits that do not count, marks the rows of pseudonyms' hits, and finds the rows
  with hits of three columns, the only ones a record can reveal (reference:
  :func:`paitient.rules.edm.match.sift_arrays`).

Compiled at first use, the machine code kept for later processes (:func:`paitient.rules.edm.compiled._jit`);
:func:`warm_up` loads every compiled function, so that a service can pay for that at start. Constants of
other modules go in as arguments: numba freezes a global into the machine code it keeps, and would not see
it change.
"""

from __future__ import annotations

import numpy as np

from paitient.rules.edm import hashing
from paitient.rules.edm import numbers as nb
from paitient.rules.edm.compiled import _jit, prefetch

# other modules' constants, passed in as arguments
_TIERS = np.array(nb.TIERS, dtype=np.int64)
_MIX = np.array([hashing._C1, hashing._C2, hashing._C3], dtype=np.uint64)


def _fmix_py(h: np.uint64, c1: np.uint64, c2: np.uint64) -> np.uint64:
    h ^= h >> np.uint64(33)
    h *= c1
    h ^= h >> np.uint64(29)
    h *= c2
    h ^= h >> np.uint64(32)
    return h


_fmix = _jit(_fmix_py)


def _absorb_py(h: np.uint64, w: np.uint64, c3: np.uint64) -> np.uint64:
    h ^= w
    h *= c3
    h ^= h >> np.uint64(31)
    return h


_absorb = _jit(_absorb_py)


def _words_py(
    view: np.ndarray,
    start: np.ndarray,
    length: np.ndarray,
    lane0: np.uint64,
    lane1: np.uint64,
    mix: np.ndarray,
    byte_mask: np.ndarray,
    out: np.ndarray,
) -> None:
    """:func:`paitient.rules.edm.hashing.word_hash` of each word, into ``out``; ``mix`` holds its constants
    C1, C2, C3."""
    c1, c2, c3 = mix[0], mix[1], mix[2]
    for i in range(len(start)):
        s = start[i]
        n = length[i]
        end = s + n
        h = np.uint64(n) * c3
        h ^= lane0
        h = _absorb(h, view[s] & byte_mask[min(n, 8)], c3)
        h = _absorb(h, view[max(end - 8, 0)] if n > 8 else np.uint64(0), c3)
        if n > 16:
            h = _absorb(h, view[s + 8], c3)
            h = _absorb(h, view[end - 16], c3)
        if n > 32:
            h = _absorb(h, view[s + 16], c3)
            h = _absorb(h, view[s + 24], c3)
            h = _absorb(h, view[end - 32], c3)
            h = _absorb(h, view[end - 24], c3)
        h ^= lane1
        out[i] = _fmix(h, c1, c2)


_words = _jit(_words_py)


def _scaled_py(x: float, tier: int, lead: int, mult: np.ndarray, bias: int) -> float:
    """:func:`paitient.rules.edm.numbers.scaled` of one value."""
    k = tier - 1 - lead
    if abs(k) > 300:  # the power itself would under- or overflow: two steps
        half = k // 2
        far: float = x * mult[half + bias] * mult[k - half + bias]
        return far
    near: float = x * mult[min(max(k + bias, 0), 2 * bias)]
    return near


_scaled = _jit(_scaled_py)


def _tiers_py(
    value: np.ndarray,
    lead: np.ndarray,
    ndigits: np.ndarray,
    tiers: np.ndarray,
    have: np.ndarray,
    mult: np.ndarray,
    mult_bias: int,
    noise: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Per printed number, the tier it is looked up at as printed and the tier of its padded lookup, 0 where
    it has none (see :func:`paitient.rules.edm.numbers.printed_queries`)."""
    n = len(value)
    low_tier, top_tier = tiers[0], tiers[len(tiers) - 1]
    plain = np.zeros(n, dtype=np.int64)
    padded = np.zeros(n, dtype=np.int64)
    for i in range(n):
        top = min(ndigits[i], top_tier)
        nat = top_tier  # natural precision: the fewest digits that give the value back within noise
        for j in range(len(tiers) - 2, -1, -1):
            s = _scaled(value[i], tiers[j], lead[i], mult, mult_bias)
            if abs(s - np.rint(s)) <= s * noise:
                nat = tiers[j]
        nat = min(nat, top)
        if top >= low_tier and have[top]:
            plain[i] = top
        if nat < top and nat >= low_tier and have[nat]:
            padded[i] = nat
    return plain, padded


_tiers = _jit(_tiers_py)


def _queries_py(
    view: np.ndarray,
    word_start: np.ndarray,
    word_len: np.ndarray,
    value: np.ndarray,
    lead: np.ndarray,
    ndigits: np.ndarray,
    tiers: np.ndarray,
    have: np.ndarray,
    lanes: np.ndarray,
    mix: np.ndarray,
    byte_mask: np.ndarray,
    mult: np.ndarray,
    mult_bias: int,
    ipow10: np.ndarray,
    exp_bias: int,
    tie_band: float,
    noise: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nw = len(word_start)
    plain, padded = _tiers(value, lead, ndigits, tiers, have, mult, mult_bias, noise)
    lookups = 0
    for i in range(len(value)):
        lookups += (1 if plain[i] > 0 else 0) + (1 if padded[i] > 0 else 0)
    size = nw + 2 * lookups  # a midpoint is looked up at its other neighbour too
    fp = np.empty(size, dtype=np.uint64)
    token = np.empty(size, dtype=np.int64)
    exact = np.zeros(size, dtype=np.bool_)
    _words(view, word_start, word_len, lanes[0], lanes[1], mix, byte_mask, fp)
    for i in range(nw):
        token[i] = i
    c1, c2 = mix[0], mix[1]
    tie_token = np.empty(lookups, dtype=np.int64)  # the midpoints' other neighbours, in the order of their lookups
    tie_exact = np.empty(lookups, dtype=np.bool_)
    tie_packed = np.empty(lookups, dtype=np.uint64)
    ties = 0
    at = nw
    for kind in range(2):  # as printed, then padded (exact entries only)
        tier_of = plain if kind == 0 else padded
        for i in range(len(value)):
            tier = tier_of[i]
            if tier == 0:
                continue
            s = _scaled(value[i], tier, lead[i], mult, mult_bias)
            low = np.floor(s)
            frac = s - low
            up = frac >= 0.5
            for other in range(2):  # the nearest mantissa, then the other neighbour
                m = np.int64(low) + (1 if up != (other == 1) else 0)
                e = lead[i] - tier + 1
                if m >= ipow10[tier]:
                    m = ipow10[tier - 1]
                    e += 1
                e = min(max(e, -exp_bias), exp_bias - 1) + exp_bias
                packed = np.uint64(tier) | (np.uint64(m) << np.uint64(3)) | (np.uint64(e) << np.uint64(23))
                if other == 0:
                    fp[at] = _fmix(_fmix(packed ^ lanes[2], c1, c2) ^ lanes[3], c1, c2)
                    token[at] = nw + i
                    exact[at] = kind == 1
                    at += 1
                elif abs(frac - 0.5) < tie_band:
                    tie_token[ties] = nw + i
                    tie_exact[ties] = kind == 1
                    tie_packed[ties] = packed
                    ties += 1
    for k in range(ties):
        fp[at] = _fmix(_fmix(tie_packed[k] ^ lanes[2], c1, c2) ^ lanes[3], c1, c2)
        token[at] = tie_token[k]
        exact[at] = tie_exact[k]
        at += 1
    return fp[:at], token[:at], exact[:at]


_queries = _jit(_queries_py)


def queries(
    view: np.ndarray,
    word_start: np.ndarray,
    word_len: np.ndarray,
    value: np.ndarray,
    lead: np.ndarray,
    ndigits: np.ndarray,
    tiers: tuple[int, ...],
    lanes: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What a text's tokens look up: (fingerprint, token, exact entries only) per lookup, the words first, then
    the numbers as :func:`paitient.rules.edm.numbers.printed_queries` gives them, in its order. ``view`` holds
    the 8-byte words of the case-folded text, ``lanes`` the key lanes of
    :class:`paitient.rules.edm.hashing.Keyed`; numbers are looked up only at ``tiers``."""
    have = np.zeros(nb.TIERS[-1] + 1, dtype=np.bool_)
    have[list(tiers)] = True
    fp, token, exact = _queries(
        view,
        word_start.astype(np.int64, copy=False),
        word_len.astype(np.int64, copy=False),
        value,
        lead,
        ndigits,
        _TIERS,
        have,
        lanes,
        _MIX,
        hashing._BYTE_MASK,
        nb._MULT,
        nb._MULT_BIAS,
        nb._IPOW10,
        nb._EXP_BIAS,
        nb._TIE_BAND,
        nb.PRINTED_NOISE,
    )
    return fp, token, exact


def _grow_py(a: np.ndarray, size: int) -> np.ndarray:
    """``a`` in a new array twice as long, its first ``size`` items kept."""
    grown = np.empty(2 * len(a), dtype=a.dtype)
    grown[:size] = a[:size]
    return grown


_grow = _jit(_grow_py)


_AHEAD = 16
"""How many queries ahead the walk over the index asks for what a query will read."""


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
    size = len(entries)
    room = len(query)
    while i < n:
        # prefetches for queries further on (the index is far larger than the caches): the directory's line
        # of the query _AHEAD on, and the first entry of the one half as far, whose directory line has
        # arrived by now; so the cache misses of many queries overlap, and the walk waits on none of them
        if i + _AHEAD < n:
            prefetch(directory, np.int64(fps[i + _AHEAD] >> bucket_shift))
            near = np.int64(directory[np.int64(fps[i + _AHEAD // 2] >> bucket_shift)])
            if near < size:
                prefetch(entries, near)
        fp = fps[i]
        bucket = np.int64(fp >> bucket_shift)
        lo = np.int64(directory[bucket])
        hi = np.int64(directory[bucket + 1])
        if count + hi - lo > room:
            return i, count
        want = (fp << bits) >> shift
        for at in range(lo, hi):
            # every entry is written, and only a match moves on (no branch to mispredict): the bucket's
            # room is there
            e = entries[at]
            query[count] = i
            found[count] = e
            count += 1 if (e >> shift) == want else 0
        i += 1
    return i, count


_walk = _jit(_walk_py)


def _lookup_py(
    fps: np.ndarray, entries: np.ndarray, directory: np.ndarray, dir_bits: int, fp_shift: int
) -> tuple[np.ndarray, np.ndarray]:
    # the arrays grow outside the walk: a loop that may replace an array it writes to runs many times slower.
    # Room for two hits a query at first, which a dump's 1.3 fills without growing: growing, the old arrays
    # and the new ones held together and then freed left the allocator giving the heap back after each scan
    # of a dump and faulting it in again on the next (16k page faults, 25 ms of system time, a scan); only
    # the pages written are touched
    n = len(fps)
    query = np.empty(2 * n + 64, dtype=np.int64)
    found = np.empty(2 * n + 64, dtype=np.uint64)
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
    # per row, the first min_columns - 1 distinct columns among its hits, column + 1 in 16 bits each (0: none
    # yet), in one word: one load per hit. Only the rows hit are cleared, so that a short text costs as
    # little against a large index as against a small one
    seen = np.empty(nrows, dtype=np.uint64)
    for i in range(n):
        seen[row[i]] = 0
    tok = np.empty(n, dtype=np.int64)
    rows = np.empty(n, dtype=np.int64)
    cols = np.empty(n, dtype=np.int64)
    slots = min_columns - 1
    kept = 0
    for i in range(n):
        if i + _AHEAD < n:  # the hits' rows are anywhere in the index's rows
            prefetch(seen, row[i + _AHEAD])
        q = query[i]
        if (exact_only[q] and not exact[i]) or (q >= words and primary[i]):
            continue
        r = row[i]
        if primary[i]:
            revealed[r] = True
            continue
        tok[kept] = token[q]
        rows[kept] = r
        cols[kept] = col[i]
        kept += 1
        c = np.uint64(col[i] + 1)
        s = seen[r]
        new = True
        for k in range(slots):
            had = (s >> np.uint64(16 * k)) & np.uint64(0xFFFF)
            if had == c:
                new = False
                break
            if had == 0:
                seen[r] = s | (c << np.uint64(16 * k))
                new = False
                break
        if new:  # a column other than the min_columns - 1 already seen
            candidates[r] = True
    return revealed, candidates, tok[:kept], rows[:kept], cols[:kept]


_sift = _jit(_sift_py)
_MOST_COLUMNS = 5
"""The most columns a row's hits are counted to: four seen ones of 16 bits fill a word."""


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
    (``token[query]``), row and column of every other hit, in the order of the hits). Columns below 2**16,
    ``min_columns`` at most 5."""
    if not 1 <= min_columns <= _MOST_COLUMNS:
        raise ValueError(f"sift counts 1 to {_MOST_COLUMNS} columns per row, not {min_columns}")
    revealed, candidates, tok, rows, cols = _sift(
        query, row, col, primary, exact, exact_only, int(words), token, int(nrows), int(min_columns)
    )
    return revealed, candidates, tok, rows, cols


def _unrevealed_py(
    candidates: np.ndarray, revealed: np.ndarray, tok: np.ndarray, row: np.ndarray, col: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(row)
    # the two masks in one: a pass over the rows costs little next to looking up two masks per hit
    pending = np.empty(len(candidates), dtype=np.bool_)
    for r in range(len(candidates)):
        pending[r] = candidates[r] and not revealed[r]
    m = 0
    for i in range(n):
        m += 1 if pending[row[i]] else 0
    # the places of the hits kept, without a branch the CPU could not predict: every hit is written, only a
    # kept one moves on; arrays no larger than the hits kept, which the allocations after them can reuse
    keep = np.empty(m + 1, dtype=np.int64)
    m = 0
    for i in range(n):
        keep[m] = i
        m += 1 if pending[row[i]] else 0
    out_tok = np.empty(m, dtype=tok.dtype)
    out_row = np.empty(m, dtype=row.dtype)
    out_col = np.empty(m, dtype=col.dtype)
    for k in range(m):
        i = keep[k]
        out_tok[k] = tok[i]
        out_row[k] = row[i]
        out_col[k] = col[i]
    return out_tok, out_row, out_col


_unrevealed = _jit(_unrevealed_py)


def unrevealed(
    candidates: np.ndarray, revealed: np.ndarray, tok: np.ndarray, row: np.ndarray, col: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The hits (``tok``, ``row``, ``col``) of rows that are ``candidates`` and not ``revealed`` (masks over
    the rows), in their order."""
    kept_tok, kept_row, kept_col = _unrevealed(candidates, revealed, tok, row, col)
    return kept_tok, kept_row, kept_col


def _decoded_py(
    entries: np.ndarray, row_shift: int, row_mask: int, col_mask: int, primary_bit: int, exact_bit: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n = len(entries)
    row = np.empty(n, dtype=np.int64)
    col = np.empty(n, dtype=np.int64)
    primary = np.empty(n, dtype=np.bool_)
    exact = np.empty(n, dtype=np.bool_)
    shift = np.uint64(row_shift)
    rmask, cmask, pbit, ebit = np.uint64(row_mask), np.uint64(col_mask), np.uint64(primary_bit), np.uint64(exact_bit)
    for i in range(n):
        e = entries[i]
        row[i] = np.int64((e >> shift) & rmask)
        col[i] = np.int64(e & cmask)
        primary[i] = (e & pbit) != 0
        exact[i] = (e & ebit) != 0
    return row, col, primary, exact


_decoded = _jit(_decoded_py)


def decoded(
    entries: np.ndarray, row_shift: int, row_mask: int, col_mask: int, primary_bit: int, exact_bit: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row, column, primary, exact) of each index entry (uint64) in one pass: the row at ``row_shift`` under
    ``row_mask``, the column under ``col_mask``, the flags at their bits."""
    row, col, primary, exact = _decoded(
        entries, int(row_shift), int(row_mask), int(col_mask), int(primary_bit), int(exact_bit)
    )
    return row, col, primary, exact


def warm_up() -> None:
    """Load (or compile) every compiled function of the scan's lookups, on inputs that take each path."""
    # words of 4, 20 and 40 bytes; a midpoint, a 4-digit value, the same padded to 8 digits
    text = np.zeros(hashing.FRONT + 80 + hashing.PAD, dtype=np.uint8)
    text[hashing.FRONT : hashing.FRONT + 80] = 97
    start = np.array([hashing.FRONT, hashing.FRONT + 5, hashing.FRONT + 30], dtype=np.int64)
    value = np.array([0.1235, 17.99, 17.99])
    lead = np.array([-1, 1, 1], dtype=np.int64)
    keyed = np.arange(8, dtype=np.uint64)
    queries(hashing.word_view(text), start, np.array([4, 20, 40]), value, lead, np.array([4, 4, 8]), nb.TIERS, keyed)
    # one bucket of 80 equal entries: more hits than the first arrays hold
    entries, directory = np.zeros(80, dtype=np.uint64), np.array([0, 80, 80], np.uint32)
    lookup(np.zeros(1, dtype=np.uint64), entries, directory, 1, 38)
    entries.flags.writeable = directory.flags.writeable = False  # as a saved index maps them
    lookup(np.zeros(1, dtype=np.uint64), entries, directory, 1, 38)
    one = np.zeros(1, dtype=np.int64)
    revealed, candidates, tok, row, col = sift(one, one, one, np.ones(1, np.bool_), one == 0, one == 1, 1, one, 1, 3)
    unrevealed(candidates, revealed, tok, row, col)
    unrevealed(~candidates, revealed, one, one, one)
    decoded(np.arange(3, dtype=np.uint64), 11, 7, 511, 512, 1024)
