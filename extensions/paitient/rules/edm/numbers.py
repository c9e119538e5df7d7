"""Numbers normalised to a few significant decimal digits, the same way from a float and from its print.

A number is compared at a *tier* of t significant digits (t in :data:`TIERS`): the mantissa m
(``10**(t-1) <= m < 10**t``) and exponent e of ``m * 10**e``, the value rounded half away from zero.
The sign is ignored and zero is no value. Both sides start from a float64: the index from the stored
value, the output side from the printed digits (parsed exactly rounded), so a value printed as it is
stored gives the very same float and the same rounding.

A stored value's *natural precision* is the fewest digits (3 to 6) that give it back as a float64
(``17.99``: 4; a value with more digits: 6, a value that went through float32 too). The index keeps a
value *exactly* at its natural precision, and *rounded* at each tier below it, from the coarsest at
which it is distinctive. A printed number is looked up at the precision it shows, ``min(digits
printed, 6)``, where exact and rounded entries match; and when the digits it shows beyond some
precision are zeros or float32 noise (``17.990000``; ``17.989999771118164``, 17.99 printed through a
float32 tensor), also at that precision, where only exact entries match. So a value matches a print
that agrees with it in every digit the print shows: ``18.00`` finds 18.0 and 17.996 but not 17.99,
which it contradicts in the 4th digit. (The stored side uses float64's tolerance: with float32's, one
random float in a few hundred would pass for a 3-digit decimal and match every print of it.)

Midpoints: where the digits beyond a tier are exactly 5 (``0.1235`` at 3 digits), the float lies a hair
below or above and a print of it may have been rounded either way, so both neighbours are candidates,
on both sides (within :data:`_TIE_BAND` of the midpoint). That also covers double rounding: a value
printed with 4 digits and looked up at 3 rounds like the value itself, or lands on a tie.
"""

from __future__ import annotations

import numpy as np

TIERS = (3, 4, 5, 6)
"""Significant digits a number is compared at. Fewer than 3 carry too little to tell rows apart."""
_TIE_BAND = 1e-7  # |fraction - 0.5| below this (in units of the last kept digit) is a tie
STORED_NOISE = 1e-12
"""Relative distance to a shorter decimal at which a stored value still is that decimal (float64)."""
PRINTED_NOISE = 1.2e-7
"""The same for a printed number, which may have gone through float32 (a tensor's values)."""
_EXP_BIAS = 1024


def powers_of_ten(low: int, high: int) -> np.ndarray:
    """``10**k`` for ``low <= k < high``, each the double nearest to it (0 below the subnormals, inf past the
    largest double). Not ``10.0 ** np.arange(...)``: numpy's vectorised power is not correctly rounded on
    every machine (on one with FMA it gave 1.0000000000000001e23 for 10**23, and 1e23 read as below it)."""
    return np.array([float(f"1e{k}") for k in range(low, high)], dtype=np.float64)


_POWERS = powers_of_ten(-324, 309)
_POWER_BIAS = 324


_IPOW10 = 10 ** np.arange(0, 8, dtype=np.int64)


def pack(tier: int | np.ndarray, mantissa: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """(tier, mantissa, exponent) as one uint64, the input of :meth:`Keyed.numbers`."""
    e = np.clip(exponent, -_EXP_BIAS, _EXP_BIAS - 1) + _EXP_BIAS
    t = np.asarray(tier).astype(np.uint64)
    result: np.ndarray = t | (mantissa.astype(np.uint64) << np.uint64(3)) | (e.astype(np.uint64) << np.uint64(23))
    return result


_MULT_BIAS = 400
_MULT = np.zeros(2 * _MULT_BIAS + 1)
with np.errstate(over="ignore"):
    _MULT[:] = 10.0 ** np.arange(-_MULT_BIAS, _MULT_BIAS + 1, dtype=np.float64)


def leading_exponent(x: np.ndarray) -> np.ndarray:
    """floor(log10(x)) for x > 0, corrected where log10 lands on the wrong side of a power of ten."""
    lead = np.floor(np.log10(x)).astype(np.int64)
    i = np.clip(lead + _POWER_BIAS, 0, len(_POWERS) - 2)
    lead -= x < _POWERS[i]
    lead += x >= _POWERS[i + 1]
    result: np.ndarray = lead
    return result


def lead_and_six(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(decimal exponent of the first digit, the value scaled to 6 digits before the point) of x > 0."""
    lead = np.floor(np.log10(x)).astype(np.int64)
    s6 = scaled(x, 6, lead)
    off = (s6 < 100_000.0) | (s6 >= 1_000_000.0)  # log10 on the wrong side of a power of ten
    if off.any():
        i = np.flatnonzero(off)
        lead[i] = leading_exponent(x[i])
        s6[i] = scaled(x[i], 6, lead[i])
    return lead, s6


def scaled(x: np.ndarray, tier: int | np.ndarray, lead: np.ndarray) -> np.ndarray:
    """``x * 10**(tier - 1 - lead)``: the value with ``tier`` digits before the point.

    One multiplication by a tabulated power of ten (exact from 10**0 to 10**22, within an ulp
    otherwise; both sides compute it alike, and the tie band and tolerances absorb the ulp). Where the
    power itself under- or overflows (values near the ends of float64's range), two steps.
    """
    k = tier - 1 - lead
    out = x * _MULT[np.clip(k + _MULT_BIAS, 0, 2 * _MULT_BIAS)]
    far = np.abs(k) > 300
    if far.any():
        half = k[far] // 2
        out[far] = x[far] * _MULT[half + _MULT_BIAS] * _MULT[k[far] - half + _MULT_BIAS]
    result: np.ndarray = out
    return result


def round_at(
    x: np.ndarray, tier: int | np.ndarray, lead: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Positive floats at ``tier`` digits: (mantissa, exponent, tie, other mantissa, other exponent).

    Where ``tie``, the value lies on a rounding midpoint (within float error) and the other neighbour
    is a candidate too.
    """
    s = scaled(x, tier, lead)
    low = np.floor(s)
    frac = s - low
    tie = np.abs(frac - 0.5) < _TIE_BAND
    up = frac >= 0.5
    low = low.astype(np.int64)
    e0 = lead - tier + 1
    m, e = _carry(low + up, e0, tier)
    alt, alt_e = _carry(low + ~up, e0, tier)
    return m, e, tie, alt, alt_e


def _carry(m: np.ndarray, e: np.ndarray, tier: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renormalise mantissas that rounded up to 10**tier."""
    over = m >= _IPOW10[tier]
    if over.any():
        m = np.where(over, _IPOW10[np.asarray(tier) - 1], m)
        e = e + over
    return m, e


def natural_precision(x: np.ndarray, lead: np.ndarray, noise: float = STORED_NOISE) -> np.ndarray:
    """Fewest digits (3..6) that give ``x`` back within ``noise`` (relative); 6 when more are needed."""
    nat = np.full(len(x), TIERS[-1], dtype=np.int64)
    for t in TIERS[-2::-1]:
        s = scaled(x, t, lead)
        near = np.abs(s - np.rint(s)) <= s * noise
        nat[near] = t
    return nat


def printed_queries(
    value: np.ndarray, lead: np.ndarray, ndigits: np.ndarray, tiers: tuple[int, ...] = TIERS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What to look up for printed numbers: (token index, packed number, exact entries only) per lookup.

    A print of k digits is looked up at tier min(k, 6); one whose digits beyond some precision are
    zeros or float32 noise, at that precision too, for exact entries only. Only at ``tiers`` the index has.
    """
    top = np.minimum(ndigits, TIERS[-1])
    nat = np.minimum(natural_precision(value, lead, PRINTED_NOISE), top)
    have = np.zeros(TIERS[-1] + 1, dtype=bool)
    have[list(tiers)] = True
    plain = np.flatnonzero((top >= TIERS[0]) & have[np.maximum(top, 0)])
    padded = np.flatnonzero((nat < top) & (nat >= TIERS[0]) & have[nat])
    tok = np.concatenate((plain, padded))
    tier = np.concatenate((top[plain], nat[padded]))
    exact = np.concatenate((np.zeros(len(plain), bool), np.ones(len(padded), bool)))
    if not len(tok):
        return tok, np.zeros(0, np.uint64), exact
    m, e, tie, alt, alt_e = round_at(value[tok], tier, lead[tok])
    packed = pack(tier, m, e)
    if tie.any():
        t = np.flatnonzero(tie)
        tok = np.concatenate((tok, tok[t]))
        packed = np.concatenate((packed, pack(tier[t], alt[t], alt_e[t])))
        exact = np.concatenate((exact, exact[t]))
    return tok, packed, exact
