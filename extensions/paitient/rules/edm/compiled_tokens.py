"""The tokens of a text in compiled passes over its bytes (numba): the arrays of the whole-array reference.

:mod:`.tokens` states the grammar and keeps the reference, :func:`paitient.rules.edm.tokens.tokenize_arrays`,
written in whole-array numpy and Arrow operations (a few dozen passes over the text, and a fixed cost per
call). :func:`scan` gives the very same arrays in two passes over the bytes:

- the numbers pass reads each run of number bytes (digits, ``.``, ``e``, ``E``, ``+``, ``-``) once, as
  ``[+-] digits [. digits] [e [+-] digits]``, the only runs the reference's byte checks and its float
  parser both let through; it keeps the first 18 significant digits in an integer mantissa m, with e the
  decimal exponent of its last digit. Where |e| <= 22, 10**|e| is an exact double, and where m <= 2**53,
  m is too, so ``m * 10**e`` (``m / 10**-e``) is one correctly rounded operation: the double an exactly
  rounding parser gives. A longer m (17 or 18 digits, as a float's repr prints) is carried in
  double-double arithmetic, to about 2**-100, and rounded; the double that gives is the nearest unless the
  value lies within that error of a midpoint between two doubles (a decimal exactly halfway, mostly). Those,
  more digits and farther exponents are parsed by Arrow, as the reference parses every number, on just them;
- the finishing pass drops zeros, infinities and counting runs, and finds the words, then the date words:
  the date of each ISO timestamp, and each date written day first with points (``04.03.2019``).

The decimal exponent of a number's first digit (``lead``) is that of its first significant digit printed,
corrected against the table of powers of ten of :func:`paitient.rules.edm.numbers.leading_exponent`, which
the reference uses, where rounding to a double carried the value over a power of ten. Numbers parsed by Arrow
get it from :func:`~paitient.rules.edm.numbers.leading_exponent` itself.

Compiled at first use, the machine code kept for later processes (:func:`paitient.rules.edm.compiled._jit`);
:func:`warm_up` loads every compiled function, so that a service can pay for that at start.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from paitient.rules.edm.compiled import _jit
from paitient.rules.edm.hashing import FRONT, MAX_WORD, PAD
from paitient.rules.edm.numbers import _POWER_BIAS, _POWERS, leading_exponent

MIN_WORD = 4
"""Shortest word (bytes) that is a token."""

# byte classes
_DIGIT, _LETTER, _E, _DOT, _SIGN, _UNDER, _MINUS, _GLUE = 1, 2, 4, 8, 16, 32, 64, 128
_NUMBER_BYTE = _DIGIT | _E | _DOT | _SIGN
_WORD_BYTE = _DIGIT | _LETTER | _UNDER | _MINUS


def _classes() -> np.ndarray:
    table = np.zeros(256, dtype=np.uint8)
    for c in range(256):
        k = 0
        if 48 <= c <= 57:
            k |= _DIGIT
        if 65 <= c <= 90 or 97 <= c <= 122:
            k |= _LETTER
            k |= _E if c in (69, 101) else _GLUE  # a letter glues a number to it, an exponent's e does not
        if c == 46:
            k |= _DOT
        if c in (43, 45):
            k |= _SIGN
        if c == 45:
            k |= _MINUS
        if c == 95:
            k |= _UNDER | _GLUE
        table[c] = k
    return table


_CLASS = _classes()
_EXACT_POWERS = np.array([float(10**k) for k in range(23)])
"""10**0 .. 10**22, every one an exact double."""
_MANTISSA_DIGITS = 18
"""Significant digits kept in an int64 mantissa; a number with more goes to Arrow."""
_EXACT_MANTISSA = 2**53
_SPLIT = 134217729.0
"""2**27 + 1, which splits a double into two halves of 26 bits (Dekker)."""
_DOUBLE_DOUBLE_ERROR = 2.0**-90
"""A bound on the relative error of :func:`_decimal_py`'s double-double value (about 2**-100), with room."""
_EXP_DIGITS = 6
"""An exponent of more digits (leading zeros included) counts as 10**6 towards the digits printed."""

_Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
_Numbers = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _digit(b: np.ndarray, i: int) -> bool:
    return bool(48 <= b[i] <= 57)


_isdigit = _jit(_digit)


def _comma_point_py(b: np.ndarray, c: int) -> bool:
    """Whether the comma at ``c`` is a decimal comma (``17,99``, ``-0,123``, ``1234,5``): between two runs of
    digits, the one before not after a point, a comma with a digit before it (``1.5,25``, ``1,5,25``: lists)
    or a word byte but a sign's ``-`` (``e5,25``, ``2019-03-04,12``), the one after not before a word byte
    (``1,1984-08-07``) nor a point or comma and a digit (``12,34.5``, ``12,34,56``), and the two not a
    thousands group (1 to 3 digits, the first not 0, then 3 digits: ``1,234``)."""
    if b[c] != 44 or not _isdigit(b, c - 1) or not _isdigit(b, c + 1):
        return False
    s = c - 1
    while _isdigit(b, s - 1):
        s -= 1
    if b[s - 1] == 46 or (b[s - 1] == 44 and _isdigit(b, s - 2)):
        return False
    if _CLASS[b[s - 1]] & _WORD_BYTE and not (b[s - 1] == 45 and not _CLASS[b[s - 2]] & _WORD_BYTE):
        return False
    t = c + 1
    while _isdigit(b, t):
        t += 1
    if _CLASS[b[t]] & _WORD_BYTE or ((b[t] == 44 or b[t] == 46) and _isdigit(b, t + 1)):
        return False
    return t - c - 1 != 3 or c - s > 3 or b[s] == 48


_comma_point = _jit(_comma_point_py, inline=True)


def _point_py(b: np.ndarray, i: int) -> bool:
    """Whether the byte at ``i`` is a number's point: ``.``, or a decimal comma."""
    if b[i] == 46:
        return True
    if b[i] != 44:
        return False
    return bool(_comma_point(b, i))


_point = _jit(_point_py, inline=True)


def _full_stop_py(b: np.ndarray, i: int) -> bool:
    """Whether the byte at ``i`` is a point before whitespace or the end (``17.99. Next``): punctuation, no
    part of a number."""
    if b[i] != 46:
        return False
    x = b[i + 1]
    return bool(x == 32 or x == 10 or x == 9 or x == 13 or x == 0)


_full_stop = _jit(_full_stop_py, inline=True)


def _after_fraction_py(b: np.ndarray, i: int) -> bool:
    """Whether ``i`` comes right after the digits that follow a number's point (``17.99`` ``|``)."""
    if not _isdigit(b, i - 1):
        return False
    j = i - 1
    while _isdigit(b, j - 1):
        j -= 1
    return bool(_point(b, j - 1))


_after_fraction = _jit(_after_fraction_py, inline=True)


def _split_py(b: np.ndarray, i: int) -> bool:
    """Whether the sign at ``i`` begins a number of its own: it follows the digits after a number's point
    (``17.99-10.38``, ``17,99+10,38``), where it cannot be an exponent's sign."""
    return bool(_CLASS[b[i]] & _SIGN) and bool(_after_fraction(b, i))


_split = _jit(_split_py, inline=True)


def _dotted_date_py(b: np.ndarray, i: int) -> bool:
    """Whether the run of two digits at ``i`` begins a date written ``DD.MM.YYYY`` standing alone: not glued
    to a letter, digit, ``_`` or ``-`` after it, nor to another number through a point on either side (the
    run is a whole word run, so nothing of the word bytes touches it before)."""
    for p in (0, 1, 3, 4, 6, 7, 8, 9):
        if not _isdigit(b, i + p):
            return False
    if b[i + 2] != 46 or b[i + 5] != 46 or _CLASS[b[i + 10]] & _WORD_BYTE:
        return False
    return not (b[i + 10] == 46 and _isdigit(b, i + 11)) and not (b[i - 1] == 46 and _isdigit(b, i - 2))


_dotted_date = _jit(_dotted_date_py)


def _two_product(a: float, b: float) -> tuple[float, float]:
    """``a * b`` as the double nearest to it and the exact rest (Dekker's product, no fused multiply-add)."""
    p = a * b
    c = _SPLIT * a
    ah = c - (c - a)
    al = a - ah
    c = _SPLIT * b
    bh = c - (c - b)
    bl = b - bh
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


_product = _jit(_two_product)


def _decimal_py(m: int, e10: int) -> float:
    """``m * 10**e10`` exactly rounded, for m < 10**18 and |e10| <= 22; NaN where this cannot tell.

    With m <= 2**53 both factors are exact doubles and one operation rounds their product or quotient
    correctly. A larger m is split into two doubles (exactly) and the value computed in double-double
    arithmetic, which carries it to about 2**-100 relatively; rounding that to a double gives the double
    nearest to the value unless the value lies within the error of a midpoint between two doubles (a
    decimal halfway between two doubles, or close to one): NaN, for a parser that rounds exactly.
    """
    if m <= _EXACT_MANTISSA:
        exact: float = float(m) * _EXACT_POWERS[e10] if e10 >= 0 else float(m) / _EXACT_POWERS[-e10]
        return exact
    mh = float(m)
    ml = float(m - np.int64(mh))  # |ml| <= 2**6: exact
    if e10 >= 0:
        power: float = _EXACT_POWERS[e10]
        p, e = _product(mh, power)
        q, f = _product(ml, power)
        s = p + q  # (s, t): the exact sum of p and q
        z = s - p
        t = (p - (s - z)) + (q - z)
        rest = (t + e) + f
    else:
        power = _EXACT_POWERS[-e10]
        s = mh / power
        a, b = _product(s, power)  # s * power, exactly
        r = ((mh - a) - b) + ml  # m - s * power (mh - a is exact: a is within a factor 2 of mh)
        rest = r / power
    hi: float = s + rest
    lo = rest - (hi - s)
    slack = abs(hi) * _DOUBLE_DOUBLE_ERROR
    up = (np.nextafter(hi, np.inf) - hi) / 2
    down = (hi - np.nextafter(hi, 0.0)) / 2
    if lo < up - slack and lo > slack - down:
        return hi
    return np.nan


_decimal = _jit(_decimal_py)


def _grow_py(a: np.ndarray) -> np.ndarray:
    """``a`` in an array twice its length."""
    b = np.empty(2 * len(a), dtype=a.dtype)
    b[: len(a)] = a
    return b


_grow = _jit(_grow_py)


def _d_exponent_py(b: np.ndarray, i: int) -> bool:
    """Whether the ``d`` or ``D`` at ``i`` is a Fortran exponent (``1.799000D+01``): after the digits that
    follow a number's point, before a digit or a sign and a digit."""
    if b[i] | 32 != 100 or not _isdigit(b, i - 1):
        return False
    if not (_isdigit(b, i + 1) or (_CLASS[b[i + 1]] & _SIGN and _isdigit(b, i + 2))):
        return False
    return bool(_after_fraction(b, i))


_d_exponent = _jit(_d_exponent_py, inline=True)


def _number_runs_py(
    buf: np.ndarray,
    i: int,
    end: int,
    powers: np.ndarray,
    bias: int,
    starts: np.ndarray,
    value: np.ndarray,
    lead: np.ndarray,
    base: np.ndarray,
    count: int,
    slow: np.ndarray,
    slow_end: np.ndarray,
    nslow: int,
    commas: np.ndarray,
) -> tuple[int, int, int]:
    """:func:`_numbers_py` from offset ``i`` on, until ``end`` or until an output array is full: (where it
    stopped, numbers, numbers left to Arrow)."""
    cls = _CLASS
    while i < end:
        if not cls[buf[i]] & _NUMBER_BYTE or _full_stop(buf, i):
            i += 1
            continue
        if count == len(starts) or nslow == len(slow):
            break  # for a larger array; nothing of this run is read yet
        cs = i
        if cls[buf[i]] & _SIGN:
            i += 1
        # the mantissa: its significant digits (the first 18 in m), and the digits after its point
        m = 0
        sig = 0
        first = i
        while True:
            d = int(buf[i]) - 48
            if d < 0 or d > 9:
                break
            sig += (sig > 0) | (d > 0)
            if sig <= _MANTISSA_DIGITS:
                m = m * 10 + d
            i += 1
        digits = i - first
        frac = 0
        point = buf[i] == 46 and not _full_stop(buf, i)
        if not point and digits > 0 and buf[i] == 44 and _comma_point(buf, i):
            point = True
            commas[0] = True
        if point:
            i += 1
            first = i
            while True:
                d = int(buf[i]) - 48
                if d < 0 or d > 9:
                    break
                sig += (sig > 0) | (d > 0)
                if sig <= _MANTISSA_DIGITS:
                    m = m * 10 + d
                i += 1
            frac = i - first
            digits += frac
        # the exponent; more than _EXP_DIGITS digits count as 10**_EXP_DIGITS
        exp = 0
        exp_digits = 1
        has_exp = False
        if digits > 0 and (cls[buf[i]] & _E or (frac > 0 and _d_exponent(buf, i))):
            has_exp = True
            i += 1
            negative = buf[i] == 45
            if cls[buf[i]] & _SIGN:
                i += 1
            first = i
            while True:
                d = int(buf[i]) - 48
                if d < 0 or d > 9:
                    break
                if i - first < _EXP_DIGITS:
                    exp = exp * 10 + d
                i += 1
            exp_digits = i - first
            if exp_digits > _EXP_DIGITS:
                exp = 10**_EXP_DIGITS
            if negative:
                exp = -exp
        # what follows may go on with the run: a number byte but a full stop or a sign that begins the next
        # number; a decimal comma only after an exponent (after the mantissa it would have been its point)
        c = cls[buf[i]]
        more = c & _NUMBER_BYTE and not (_full_stop(buf, i) or _split(buf, i))
        if not more and has_exp and buf[i] == 44 and _comma_point(buf, i):
            more = True
            commas[0] = True
        if digits == 0 or exp_digits == 0 or more:
            while True:  # not a number: the rest of the run (zero bytes end it)
                if cls[buf[i]] & _NUMBER_BYTE:
                    if _full_stop(buf, i) or _split(buf, i):
                        break
                elif buf[i] == 44 and _comma_point(buf, i):
                    commas[0] = True
                elif not _d_exponent(buf, i):
                    break
                i += 1
            continue
        ce = i
        # zero; glued to a letter or '_' on either side; followed by ':' (a key or a label)
        if sig == 0:
            continue
        # glued to a letter, or to '_' or a key where it has no point (one with a point is a value joined to
        # others, 17.99_10.38, or used as a key, {17.99: 'mean radius'})
        if cls[buf[cs - 1]] & _GLUE or cls[buf[ce]] & _GLUE:
            if (
                not point
                or (buf[cs - 1] != 95 and cls[buf[cs - 1]] & _GLUE)
                or (buf[ce] != 95 and cls[buf[ce]] & _GLUE)
            ):
                continue
        after = ce + 1 if buf[ce] == 34 or buf[ce] == 39 else ce
        if buf[after] == 58 and not point:
            continue
        starts[count] = cs
        base[count] = frac + 1 - exp
        e10 = exp - frac
        x = np.nan
        if exp_digits <= _EXP_DIGITS and sig <= _MANTISSA_DIGITS and -22 <= e10 <= 22:
            x = _decimal(m, e10)
        if np.isnan(x):
            lead[count] = 0
            slow[nslow] = count
            slow_end[nslow] = ce
            nslow += 1
        else:
            guess = sig - 1 + e10
            at = min(max(guess + bias, 0), len(powers) - 2)
            lead[count] = guess - (1 if x < powers[at] else 0) + (1 if x >= powers[at + 1] else 0)
        value[count] = x
        count += 1
    return i, count, nslow


_number_runs = _jit(_number_runs_py)


def _numbers_py(buf: np.ndarray, start: int, end: int, powers: np.ndarray, bias: int) -> _Numbers:
    """Number candidates of ``buf[start:end]``: (start, |value|, lead, digits printed less lead; the
    candidates that Arrow parses, and their ends; whether any comma of the text is a decimal comma: every
    one that is stands after a run of digits this pass reads). Candidates with no nonzero digit are left out (zero is no
    value).

    A candidate is a whole run of number bytes that reads ``[+-] digits [. digits] [e [+-] digits]`` with a
    digit in the mantissa. That is what the reference's byte checks (a sign leads or follows an exponent's
    e and has a digit after it, a point has a digit beside it, an e has a digit or a point and a digit
    before it and a digit after it) and its float parser (one point, one e, the point first) together let
    through.
    """
    cap = (end - start) // 8 + 16
    starts = np.empty(cap, dtype=np.int64)
    value = np.empty(cap, dtype=np.float64)
    lead = np.empty(cap, dtype=np.int64)
    base = np.empty(cap, dtype=np.int64)
    slow = np.empty(cap // 8 + 16, dtype=np.int64)
    slow_end = np.empty(cap // 8 + 16, dtype=np.int64)
    commas = np.zeros(1, dtype=np.bool_)  # whether a comma was a decimal comma
    count = 0
    nslow = 0
    i = start
    while True:
        i, count, nslow = _number_runs(
            buf, i, end, powers, bias, starts, value, lead, base, count, slow, slow_end, nslow, commas
        )
        if i >= end:
            break
        if count == len(starts):
            starts, value, lead, base = _grow(starts), _grow(value), _grow(lead), _grow(base)
        if nslow == len(slow):
            slow, slow_end = _grow(slow), _grow(slow_end)
    return starts[:count], value[:count], lead[:count], base[:count], slow[:nslow], slow_end[:nslow], commas


_numbers = _jit(_numbers_py)


def _gather_py(
    buf: np.ndarray, starts: np.ndarray, which: np.ndarray, ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The bytes of the candidates ``which`` (ending at ``ends``), one after the other, and the offsets of an
    Arrow string array of them."""
    offsets = np.empty(len(which) + 1, dtype=np.int32)
    offsets[0] = 0
    total = 0
    for j in range(len(which)):
        total += ends[j] - starts[which[j]]
        offsets[j + 1] = total
    data = np.empty(total, dtype=np.uint8)
    at = 0
    for j in range(len(which)):
        for p in range(starts[which[j]], ends[j]):
            x = buf[p]
            data[at] = 46 if x == 44 else 101 if x | 32 == 100 else x  # a decimal comma, a Fortran exponent
            at += 1
    return data, offsets


_gather = _jit(_gather_py)


def _parse_slow(
    buf: np.ndarray, starts: np.ndarray, value: np.ndarray, lead: np.ndarray, slow: np.ndarray, ends: np.ndarray
) -> None:
    """|value| and lead of the candidates ``slow`` (ending at ``ends``), parsed by Arrow (exactly rounded),
    in place."""
    data, offsets = _gather(buf, starts, slow, ends)
    text = pa.StringArray.from_buffers(len(slow), pa.py_buffer(offsets), pa.py_buffer(data))
    x = np.abs(pc.cast(text, pa.float64()).to_numpy())
    value[slow] = x
    usable = np.flatnonzero(np.isfinite(x) & (x > 0))
    lead[slow[usable]] = leading_exponent(x[usable])


def _finish_py(
    buf: np.ndarray,
    start: int,
    end: int,
    max_word: int,
    starts: np.ndarray,
    value: np.ndarray,
    lead: np.ndarray,
    base: np.ndarray,
    commas: bool,
) -> _Arrays:
    """(word start, word length, number start, |value|, lead, digits printed): the numbers that are values
    (no zero or infinity, not in a counting run), then the words. ``commas``: whether the text has a decimal
    comma (the numbers pass tells), which only then need be looked for beside a word."""
    k = len(starts)
    usable = np.empty(k, dtype=np.int64)
    u = 0
    for j in range(k):
        x = value[j]
        if np.isfinite(x) and x > 0:
            usable[u] = j
            u += 1
    # a counting run: three or more numbers that step by exactly 1 (step[j]: value j less value j - 1 is 1)
    step = np.zeros(u + 1, dtype=np.bool_)
    for j in range(1, u):
        step[j] = value[usable[j]] - value[usable[j - 1]] == 1.0
    counting = np.zeros(u, dtype=np.bool_)
    for j in range(u):
        if step[j] and step[j + 1]:
            counting[j] = True
            if j > 0:
                counting[j - 1] = True
            if j + 1 < u:
                counting[j + 1] = True
    kept = u - np.sum(counting)
    num_start = np.empty(kept, dtype=np.int64)
    num_value = np.empty(kept, dtype=np.float64)
    num_lead = np.empty(kept, dtype=np.int64)
    num_digits = np.empty(kept, dtype=np.int64)
    at = 0
    for j in range(u):
        if not counting[j]:
            c = usable[j]
            num_start[at] = starts[c]
            num_value[at] = value[c]
            num_lead[at] = lead[c]
            num_digits[at] = base[c] + lead[c]
            at += 1
    # words: runs of [A-Za-z0-9_-], MIN_WORD..max_word long; then the dates: of each ISO timestamp run, and
    # those written DD.MM.YYYY, in the order of the text
    cls = _CLASS
    n = end - start
    cap = n // (MIN_WORD + 1) + 1
    word_start = np.empty(cap, dtype=np.int64)
    word_len = np.empty(cap, dtype=np.int64)
    dates = np.empty(n // 11 + 1, dtype=np.int64)  # a date takes 10 bytes and one that does not glue
    nw = 0
    nd = 0
    nxt = 0  # the first number that does not start before the current word
    i = start
    while i < end:
        if not cls[buf[i]] & _WORD_BYTE:
            i += 1
            continue
        ws = i
        while cls[buf[i]] & _WORD_BYTE:
            i += 1
        we = i
        ln = we - ws
        if ln == 2 and _dotted_date(buf, ws):
            dates[nd] = ws
            nd += 1
            continue
        if ln < MIN_WORD or ln > max_word:
            continue
        # digits next to a decimal point that has a digit on its other side are part of a number
        frac = buf[ws - 1] == 46 and _isdigit(buf, ws - 2) and _isdigit(buf, ws)
        head = buf[we] == 46 and _isdigit(buf, we + 1) and _isdigit(buf, we - 1)
        if commas:
            frac = frac or (buf[ws - 1] == 44 and _comma_point(buf, ws - 1))
            head = head or (buf[we] == 44 and _comma_point(buf, we))
        signed = False
        if buf[ws] == 45 and _isdigit(buf, ws + 1):  # a signed whole number is a number, no word
            while nxt < kept and num_start[nxt] < ws:
                nxt += 1
            signed = bool(nxt < kept and num_start[nxt] == ws)
        if not (frac or head or signed):
            word_start[nw] = ws
            word_len[nw] = ln
            nw += 1
        if ln > 10 and not frac and (buf[ws + 10] | 32) == 116 and buf[ws + 4] == 45 and buf[ws + 7] == 45:
            date = True
            for p in (0, 1, 2, 3, 5, 6, 8, 9):
                if not _isdigit(buf, ws + p):
                    date = False
            if date:
                dates[nd] = ws
                nd += 1
    words = np.empty(nw + nd, dtype=np.int64)
    lengths = np.empty(nw + nd, dtype=np.int64)
    words[:nw] = word_start[:nw]
    lengths[:nw] = word_len[:nw]
    words[nw:] = dates[:nd]
    lengths[nw:] = 10
    return words, lengths, num_start, num_value, num_lead, num_digits


_finish = _jit(_finish_py)


def _scan_py(
    buf: np.ndarray, start: int, end: int, max_word: int, powers: np.ndarray, bias: int
) -> tuple[bool, _Arrays, _Numbers]:
    """The numbers pass and, where it leaves no number to Arrow, the finishing pass: (finished, the tokens,
    the numbers pass's arrays where not finished)."""
    numbers = _numbers(buf, start, end, powers, bias)
    starts, value, lead, base, slow, _, commas = numbers
    ints = np.zeros(0, dtype=np.int64)
    floats = np.zeros(0, dtype=np.float64)
    if len(slow):
        return False, (ints, ints, ints, floats, ints, ints), numbers
    tokens = _finish(buf, start, end, max_word, starts, value, lead, base, commas[0])
    return True, tokens, (ints, floats, ints, ints, ints, ints, commas)


_scan = _jit(_scan_py)


def scan(buf: np.ndarray, n: int) -> _Arrays:
    """(word start, word length, number start, |value|, lead, digits printed) of the text ``buf[FRONT:FRONT
    + n]`` (uint8, FRONT zero bytes before it and PAD after it): the arrays of
    :func:`paitient.rules.edm.tokens.tokenize_arrays`."""
    # constants of other modules go in as arguments: numba freezes a global into the machine code it keeps,
    # and would not see it change
    finished, tokens, numbers = _scan(buf, FRONT, FRONT + n, MAX_WORD, _POWERS, _POWER_BIAS)
    if finished:
        result: _Arrays = tokens
        return result
    starts, value, lead, base, slow, ends, commas = numbers
    _parse_slow(buf, starts, value, lead, slow, ends)
    result = _finish(buf, FRONT, FRONT + n, MAX_WORD, starts, value, lead, base, bool(commas[0]))
    return result


def _lowered_py(buf: np.ndarray) -> np.ndarray:
    out = np.empty_like(buf)
    for i in range(len(buf)):
        b = buf[i]
        out[i] = b | np.uint8(32) if np.uint8(b - np.uint8(65)) < np.uint8(26) else b
    return out


_lowered = _jit(_lowered_py)


def lowered(buf: np.ndarray) -> np.ndarray:
    """:func:`paitient.rules.edm.tokens.lowered` (A-Z to a-z) in one compiled pass."""
    result: np.ndarray = _lowered(buf)
    return result


_SAMPLE = b"2019-03-04T10:00 P-7F3SJGQVFCSMMGDI, 17.99 -0.0001184 1.5E+03 0.12345678901234567 1e-320 [1, 2, 3]"


def warm_up() -> None:
    """Load (or compile) every compiled function of the scan, on a short text that takes each path."""
    buf = np.zeros(FRONT + len(_SAMPLE) + PAD, dtype=np.uint8)
    buf[FRONT : FRONT + len(_SAMPLE)] = np.frombuffer(_SAMPLE, dtype=np.uint8)
    scan(buf, len(_SAMPLE))
    lowered(buf)
