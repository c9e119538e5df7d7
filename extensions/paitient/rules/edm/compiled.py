"""The index build's per-value loop over a numeric column, compiled (numba).

:func:`sort_key` packs each value of a numeric column into the key the column is sorted by;
:func:`number_entries` takes the sorted keys (see :func:`paitient.rules.edm.columns.number_key`) and decides,
which of them the index keeps and at which tiers: the values' natural precision, the exact entries, the
coarsest tier at which each is distinctive, and the neighbour of a rounding midpoint. Sorting made equal
values neighbours, and rounding keeps the order, so every count is a run length.

Compiled at first use and kept for later processes (:func:`_jit`, which the tokenizer's compiled scan,
:mod:`.compiled_tokens`, uses too: every process that tokenises text, the egress service included, loads
numba). :func:`number_entries_py` is the same function run by the interpreter, which the tests hold the
compiled one to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from paitient.rules.edm.numbers import TIERS

_EXP_BIAS = 1024
Entries = tuple[np.ndarray, np.ndarray, np.ndarray, int, set[int]]
"""Packed entries, the position each comes from, whether each is exact; values indexed, tiers used."""


def _jit(function: Callable[..., Any], inline: bool = False) -> Any:
    """``function`` compiled at its first call, the machine code kept in ``__pycache__`` for the next
    process (compiling takes about two seconds, loading it a tenth); where nothing can be kept, compiled anew
    in each process. With ``inline``, numba puts its code into each compiled caller (a small check on the
    hot path of a loop, which a call would slow down)."""
    how: Literal["always", "never"] = "always" if inline else "never"  # numba's default is never
    try:
        return numba.njit(cache=True, inline=how)(function)
    except RuntimeError:  # no cache folder numba may write
        return numba.njit(cache=False, inline=how)(function)


def _prefetch(typingctx: Any, array: Any, at: Any) -> Any:
    """In compiled code, ``prefetch(array, at)`` asks the CPU to start loading ``array[at]`` into its caches
    and goes on without waiting (LLVM's ``llvm.prefetch``: a hint, which changes no result). A loop over
    random places in a large array (the index lookup) issues it some iterations ahead, so that the cache
    misses of those iterations overlap; an ordinary load would hold the loop up."""
    sig = types.void(array, at)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        kind = signature.args[0]
        arr = context.make_array(kind)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(  # type: ignore[no-untyped-call]  # numba's code generation is untyped
            context, builder, kind, arr, [args[1]], wraparound=False
        )
        byte_ptr = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(  # type: ignore[no-untyped-call]
            builder.module, ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32]), "llvm.prefetch.p0"
        )
        # a read, kept in every level of the caches, of data (not instructions)
        builder.call(fn, [builder.bitcast(ptr, byte_ptr), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


prefetch: Any = intrinsic(_prefetch)


def _pack_py(tier: int, mantissa: int, exponent: int) -> np.uint64:
    e = min(max(exponent, -_EXP_BIAS), _EXP_BIAS - 1) + _EXP_BIAS
    return np.uint64(tier) | (np.uint64(mantissa) << np.uint64(3)) | (np.uint64(e) << np.uint64(23))


def _rounded_py(m6: int, e6: int, tier: int) -> tuple[int, int, bool, int, int]:
    """A 6-digit mantissa at ``tier`` digits: (mantissa, exponent, on a midpoint, lower neighbour, its exponent)."""
    div = 10 ** (6 - tier)
    q = m6 // div
    r2 = (m6 - q * div) * 2
    m = q + (1 if r2 >= div else 0)
    e = e6 + (6 - tier)
    if m >= 10**tier:
        m = 10 ** (tier - 1)
        e += 1
    return m, e, r2 == div, q, e6 + (6 - tier)


_pack = _jit(_pack_py)
_rounded = _jit(_rounded_py)


def _keys_py(lead: np.ndarray, s6: np.ndarray, noise: float) -> np.ndarray:
    n = len(s6)
    key = np.empty(n, dtype=np.uint64)
    for i in range(n):
        m = np.rint(s6[i])
        close = abs(s6[i] - m) <= s6[i] * noise  # the value has at most 6 digits
        e = lead[i] - 5
        if m >= 1_000_000.0:  # 999999.6 rounds up a decade
            m = 100_000.0
            e += 1
        value = (np.uint64(e + 1024) << np.uint64(20)) | np.uint64(m)
        key[i] = (value << np.uint64(28)) | (np.uint64(1 if close else 0) << np.uint64(27)) | np.uint64(i)
    return key


_keys = _jit(_keys_py)


def sort_key(lead: np.ndarray, s6: np.ndarray, noise: float) -> np.ndarray:
    """The key of :func:`paitient.rules.edm.columns.number_key` (unsorted) of values given by their leading
    exponent and their value scaled to 6 digits before the point."""
    key: np.ndarray = _keys(lead.astype(np.int64), s6.astype(np.float64), float(noise))
    return key


def _entries(key: np.ndarray, thr: int, rounded: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray]:
    n = len(key)
    # the sorted key packs (exponent + 1024, 6-digit mantissa, at most 6 digits?, position): 12, 20, 1, 27 bits
    m6 = np.empty(n, dtype=np.int64)
    e6 = np.empty(n, dtype=np.int64)
    close = np.empty(n, dtype=np.bool_)
    for i in range(n):
        k = key[i]
        m6[i] = np.int64((k >> np.uint64(28)) & np.uint64((1 << 20) - 1))
        e6[i] = np.int64(k >> np.uint64(48)) - 1024
        close[i] = ((k >> np.uint64(27)) & np.uint64(1)) == np.uint64(1)
    # natural precision: the fewest digits (3..6) that give the value back
    natural = np.full(n, 6, dtype=np.int64)
    for i in range(n):
        if close[i]:
            if m6[i] % 1000 == 0:
                natural[i] = 3
            elif m6[i] % 100 == 0:
                natural[i] = 4
            elif m6[i] % 10 == 0:
                natural[i] = 5
    # exact entries: at most thr rows have this very value
    exact_ok = np.zeros(n, dtype=np.bool_)
    i = 0
    while i < n:
        j = i + 1
        while j < n and m6[j] == m6[i] and e6[j] == e6[i]:
            j += 1
        if j - i <= thr:
            exact_ok[i:j] = True
        i = j
    # rounded entries: fine to coarse, the coarsest tier where at most thr rows share the rounded value (a
    # tier where none is distinctive has no coarser one where any is)
    coarsest = np.zeros(n, dtype=np.int64)
    if rounded:
        for tier in (5, 4, 3):
            below = False
            for k in range(n):
                if natural[k] > tier:
                    below = True
                    break
            if not below:
                continue
            distinct = False
            i = 0
            mi, ei, _, _, _ = _rounded(m6[0], e6[0], tier)
            while i < n:
                j = i + 1
                while j < n:
                    mj, ej, _, _, _ = _rounded(m6[j], e6[j], tier)
                    if mj != mi or ej != ei:
                        mi, ei = mj, ej  # the next run's value
                        break
                    j += 1
                if j - i <= thr:
                    for k in range(i, j):
                        if natural[k] > tier:
                            coarsest[k] = tier
                            distinct = True
                i = j
            if not distinct:
                break
    # the entries, tier by tier: exact ones, rounded ones, then the lower neighbours of midpoints; each value
    # in order within each of these twelve groups. One pass counts the groups, one fills them.
    sizes = np.zeros(21, dtype=np.int64)  # group (tier, kind) at 3 * tier + kind, kind 0 exact, 1 rounded, 2 twin
    cells = 0
    for k in range(n):
        if exact_ok[k]:
            sizes[3 * natural[k]] += 1
        if coarsest[k] > 0:
            for tier in range(coarsest[k], natural[k]):
                sizes[3 * tier + 1] += 1
                if _rounded(m6[k], e6[k], tier)[2]:
                    sizes[3 * tier + 2] += 1
        if coarsest[k] > 0 or exact_ok[k]:
            cells += 1
    starts = np.zeros(21, dtype=np.int64)
    for g in range(1, 21):
        starts[g] = starts[g - 1] + sizes[g - 1]
    count = starts[20] + sizes[20]
    packed = np.empty(count, dtype=np.uint64)
    position = np.empty(count, dtype=np.int64)
    exact = np.zeros(count, dtype=np.bool_)
    used = np.zeros(7, dtype=np.bool_)
    for k in range(n):
        at_position = np.int64(key[k] & np.uint64((1 << 27) - 1))
        if exact_ok[k]:
            tier = natural[k]
            at = starts[3 * tier]
            packed[at] = _pack(tier, m6[k] // 10 ** (6 - tier), e6[k] + (6 - tier))
            position[at] = at_position
            exact[at] = True
            used[tier] = True
            starts[3 * tier] += 1
        if coarsest[k] > 0:
            for tier in range(coarsest[k], natural[k]):
                m, e, tie, q, eq = _rounded(m6[k], e6[k], tier)
                at = starts[3 * tier + 1]
                packed[at] = _pack(tier, m, e)
                position[at] = at_position
                used[tier] = True
                starts[3 * tier + 1] += 1
                if tie:
                    at = starts[3 * tier + 2]
                    packed[at] = _pack(tier, q, eq)
                    position[at] = at_position
                    starts[3 * tier + 2] += 1
    return packed, position, exact, cells, used


_entries_jit = _jit(_entries)


def number_entries(
    key: np.ndarray, thr: int, *, rounded: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, set[int]]:
    """The entries of a numeric column from its sorted key (see :func:`paitient.rules.edm.columns.numbers`):
    packed (tier, mantissa, exponent), the position each one comes from, whether it is exact; the number of
    values indexed and the tiers used."""
    return _typed(*_entries_jit(key, int(thr), bool(rounded)))


def number_entries_py(
    key: np.ndarray, thr: int, *, rounded: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, set[int]]:
    """:func:`number_entries` run by the interpreter (slow; the reference the compiled one is tested against)."""
    return _typed(*_entries(key, int(thr), bool(rounded)))


def _grouped(codes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    first = np.zeros(n + 1, dtype=np.int64)
    for c in codes:
        if c >= 0:
            first[c + 1] += 1
    for v in range(n):
        first[v + 1] += first[v]
    fill = first[:n].copy()
    rows = np.empty(first[n], dtype=np.int64)
    for i in range(len(codes)):
        c = codes[i]
        if c >= 0:
            rows[fill[c]] = i
            fill[c] += 1
    return first, rows


_grouped_jit = _jit(_grouped)


def rows_by_code(codes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of each code 0..n-1 (``codes`` int64, -1 for none), in one pass and a counting sort: ``rows``
    lists code 0's rows in ascending order, then code 1's, ...; code v's lie at ``first[v]:first[v + 1]``.
    The same as a stable argsort of ``codes`` without its -1s, in linear time."""
    first, rows = _grouped_jit(codes.astype(np.int64, copy=False), int(n))
    return first, rows


def _typed(packed: np.ndarray, position: np.ndarray, exact: np.ndarray, cells: int, used: np.ndarray) -> Entries:
    return packed, position, exact, int(cells), {t for t in TIERS if used[t]}
