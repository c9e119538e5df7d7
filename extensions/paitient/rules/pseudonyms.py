"""Pure column transforms: keyed pseudonyms, per-patient date shifts, generalisation, k-anonymity.

Everything here takes Arrow arrays and returns Arrow arrays, holds no state and touches no files.
Identifiers repeat (a patient has many rows), so each distinct value is hashed once and mapped back.
Error messages name the column and row (1-based, header not counted), never the offending value.
"""

from __future__ import annotations

import datetime as dt
import hashlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc


class ColumnError(ValueError):
    """A column's values do not fit what the spec asks of them."""

    def __init__(self, column: str, message: str, row: int | None = None):
        self.column = column
        self.row = row
        self.message = message
        where = f"column {column!r}" + (f", row {row}" if row is not None else "")
        super().__init__(f"{where}: {message}")


PSEUDONYM_BYTES = 10  # 80 bits -> 16 base32 characters
DIGEST_BYTES = 18  # pseudonym + 8 bytes for the date shift


def _single(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        if arr.num_chunks == 1:
            return arr.chunk(0)
        if pa.types.is_dictionary(arr.type):
            arr = arr.unify_dictionaries()
        return arr.combine_chunks()
    return arr


def _plain(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    arr = _single(arr)
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    return arr


def _indices(arr: pa.DictionaryArray) -> np.ndarray:
    idx = arr.indices
    if idx.null_count:
        idx = idx.fill_null(-1)
    out: np.ndarray = idx.to_numpy(zero_copy_only=False).astype(np.int64)
    return out


def _codes(arr: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Dictionary codes (int64, -1 where missing) and the distinct values."""
    arr = _single(arr)
    if pa.types.is_dictionary(arr.type):
        return _recode(_indices(arr), arr.dictionary)
    enc = arr.dictionary_encode()
    return _indices(enc), enc.dictionary


def _take(table: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``table[codes]``, with code -1 (missing) reading ``table[0]``; the caller masks those rows."""
    return table.take(codes, mode="clip")


def _dictionary(codes: np.ndarray, values: pa.Array) -> pa.DictionaryArray:
    """Rows as indices into distinct values (written to Parquet as plain values, without a row-wise copy)."""
    idx = codes.astype(np.int32)
    if len(codes) and idx.min() < 0:
        return pa.DictionaryArray.from_arrays(pa.array(idx, mask=idx < 0), values)
    return pa.DictionaryArray.from_arrays(pa.array(idx), values)


def used_values_only(arr: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """A dictionary-encoded column whose dictionary holds only the values its rows use; others unchanged.

    A Parquet file's dictionary may list values no row holds (a pandas Categorical keeps all its
    categories: a master list of names or addresses, of people who are not in the table). Written back
    as it came, such a dictionary would publish them; every step that looks at rows would never see them.
    """
    if not pa.types.is_dictionary(arr.type):
        return arr
    single = _single(arr)
    codes = _indices(single)
    used = np.bincount(codes[codes >= 0], minlength=len(single.dictionary)) > 0
    if used.all():
        return single
    kept = np.where(codes < 0, -1, _take(np.cumsum(used) - 1, codes))
    return _dictionary(kept, single.dictionary.filter(pa.array(used)))


def used_values_only_table(table: pa.Table) -> pa.Table:
    """:func:`used_values_only` for every column of ``table``."""
    for i, f in enumerate(table.schema):
        if pa.types.is_dictionary(f.type):
            table = table.set_column(i, f.name, used_values_only(table.column(i)))
    return table


def _recode(codes: np.ndarray, values: pa.Array, before: pa.Array | None = None) -> tuple[np.ndarray, pa.Array]:
    """Merge distinct values that became equal (or missing) after cleaning; codes follow.

    ``before``: the distinct values before cleaning; when cleaning changed none, there is nothing to merge.
    """
    if (
        before is not None
        and before.type == values.type
        and values.null_count == before.null_count
        and pc.all(pc.equal(values, before)).as_py() in (True, None)
    ):
        return codes, values
    inner, merged = _codes(values)
    if len(merged) == len(values) and not (inner < 0).any():
        return codes, merged
    out = np.where(codes < 0, -1, _take(inner, codes))
    return out, merged


def _clean_text(values: pa.Array) -> pa.Array:
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        values = values.cast(pa.string())
    values = pc.utf8_trim_whitespace(values)
    return pc.if_else(pc.equal(values, ""), pa.scalar(None, values.type), values)


def identifier_codes(arr: pa.Array | pa.ChunkedArray, *, trust_distinct: bool = False) -> tuple[np.ndarray, pa.Array]:
    """The identifiers' text form (trimmed; empty counts as missing) as codes into distinct values.

    Codes are -1 where the identifier is missing. Only distinct values are cleaned, not every row.
    ``trust_distinct``: take a dictionary's values as distinct without checking; only for a caller that
    proves it afterwards (:func:`hashed_identifiers` does, by the digests).
    """
    arr = _single(arr)
    if not pa.types.is_dictionary(arr.type):
        codes, values = _codes(arr)
    else:
        codes, values = _indices(arr), arr.dictionary
        if not trust_distinct or values.null_count:  # a missing value inside the dictionary: the careful way
            codes, values = _recode(codes, values)
        used = np.bincount(codes[codes >= 0], minlength=len(values)) > 0  # a file's dictionary may hold
        if not used.all():  # values no row uses
            codes = np.where(codes < 0, -1, _take(np.cumsum(used) - 1, codes))
            values = values.filter(pa.array(used))
    return _recode(codes, _clean_text(values), values)


def _repeats(d: np.ndarray) -> bool:
    """Whether two digests share their first 64 bits (equal values always do)."""
    head = np.sort(np.ascontiguousarray(d[:, :8]).view("<u8").reshape(-1))
    return bool((head[1:] == head[:-1]).any())


def hashed_identifiers(arr: pa.Array | pa.ChunkedArray, key: bytes) -> tuple[np.ndarray, pa.Array, np.ndarray]:
    """:func:`identifier_codes` and the :func:`digests` of the distinct values under ``key``.

    A dictionary's values (text columns of a Parquet source) are taken as distinct and then proven so:
    equal values have equal digests, so when no two digests share their first 64 bits, no two values are
    equal. Otherwise (a dictionary holding a value twice, or a 64-bit clash) the values are merged the
    careful way and hashed again.
    """
    codes, values = identifier_codes(arr, trust_distinct=True)
    d = digests(values, key)
    if _repeats(d):
        codes, values = identifier_codes(arr)
        d = digests(values, key)
    return codes, values, d


def digests(values: list[str] | pa.Array, key: bytes) -> np.ndarray:
    """Keyed BLAKE2b of each value's UTF-8 text: bytes 0-9 make the pseudonym, bytes 10-17 the date shift."""
    if isinstance(values, pa.Array):
        raw = values.cast(pa.binary()).to_pylist()
    else:
        raw = [v.encode() for v in values]
    base = hashlib.blake2b(key=key, digest_size=DIGEST_BYTES, person=b"pt-pseudonym")
    copy = base.copy
    out: list[bytes] = []
    append = out.append
    for v in raw:
        h = copy()
        h.update(v)
        append(h.digest())
    return np.frombuffer(b"".join(out), dtype=np.uint8).reshape(len(values), DIGEST_BYTES)


def domain_key(pkey: bytes, domain: str) -> bytes:
    """Separate pseudonym spaces inside a project (e.g. patients vs. lab orders); "" is the default."""
    if not domain:
        return pkey
    return hashlib.blake2b(domain.encode(), key=pkey, digest_size=32, person=b"pt-domain").digest()


_B32 = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", dtype=np.uint8)
_B32_PAIRS = _B32[np.arange(1024) >> 5].astype(np.uint16) | (_B32[np.arange(1024) & 31].astype(np.uint16) << 8)


def encode_pseudonyms(d: np.ndarray, prefix: str = "P-") -> pa.Array:
    """The first 80 bits of each digest as 16 base32 characters behind ``prefix``."""
    n = len(d)
    b = d[:, :10].reshape(n, 2, 5).astype(np.uint16)  # two groups of 5 bytes = 40 bits
    ten = np.empty((n, 2, 4), dtype=np.uint16)  # each group as four 10-bit numbers, most significant first
    ten[..., 0] = (b[..., 0] << 2) | (b[..., 1] >> 6)
    ten[..., 1] = ((b[..., 1] & 63) << 4) | (b[..., 2] >> 4)
    ten[..., 2] = ((b[..., 2] & 15) << 6) | (b[..., 3] >> 2)
    ten[..., 3] = ((b[..., 3] & 3) << 8) | b[..., 4]
    pairs = _B32_PAIRS.take(ten.reshape(n, 8))  # each 10 bits -> two characters (a little-endian uint16)
    p = np.frombuffer(prefix.encode(), dtype=np.uint8)
    width = len(p) + 16
    buf = np.empty((n, width), dtype=np.uint8)
    buf[:, : len(p)] = p
    buf[:, len(p) :] = pairs.view(np.uint8)
    offsets = np.arange(0, width * (n + 1), width, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(buf))


def pseudonym_strings(values: list[str] | pa.Array, key: bytes, prefix: str = "P-") -> pa.Array:
    return encode_pseudonyms(digests(values, key), prefix)


def pseudonymise(
    arr: pa.Array | pa.ChunkedArray, key: bytes, *, domain: str = "", prefix: str = "P-", column: str = ""
) -> pa.Array:
    """Replace each identifier by its pseudonym; missing stays missing."""
    codes, values, d = hashed_identifiers(arr, domain_key(key, domain))
    return pseudonyms_by_code(codes, values, key, domain=domain, prefix=prefix, column=column, precomputed=d)


def pseudonyms_by_code(
    codes: np.ndarray,
    values: pa.Array,
    key: bytes,
    *,
    domain: str = "",
    prefix: str = "P-",
    column: str = "",
    precomputed: np.ndarray | None = None,
) -> pa.Array:
    """:func:`pseudonymise` for identifiers already split by :func:`identifier_codes` (dictionary-encoded).

    ``precomputed``: the values' :func:`digests` under ``domain_key(key, domain)``, if already made.
    """
    d = precomputed if precomputed is not None else digests(values, domain_key(key, domain))
    if _repeats(d):  # an 80-bit collision: never seen, but never silent
        table = encode_pseudonyms(d, prefix)
        if pc.count_distinct(table).as_py() != len(values):
            raise ColumnError(column, "two identifiers got the same pseudonym; report this, it should never happen")
    return _dictionary(codes, encode_pseudonyms(d, prefix))


def shifts_from_digests(d: np.ndarray, window: int, unit: int = 1) -> np.ndarray:
    """Each patient's offset in days: uniform over -window..-1 and 1..window (never 0). With ``unit`` 7, whole
    weeks: uniform over -(window // 7)..-1 and 1..window // 7 weeks, so each date keeps its weekday."""
    count = window // unit
    if count < 1:
        raise ValueError(f"a window of {window} days holds no whole offset of {unit} days")
    u = np.ascontiguousarray(d[:, PSEUDONYM_BYTES:DIGEST_BYTES]).view("<u8").reshape(-1) % np.uint64(2 * count)
    off = u.astype(np.int64) - count
    off[off >= 0] += 1
    return off * unit


def shift_days(values: list[str] | pa.Array, key: bytes, window: int, unit: int = 1) -> np.ndarray:
    """Per-patient offsets from the patients' identifiers under the project key."""
    return shifts_from_digests(digests(values, key), window, unit)


def parse_dates(arr: pa.Array | pa.ChunkedArray, column: str, fmt: str = "") -> pa.Array:
    """Dates stay dates; text becomes date32 (``YYYY-MM-DD`` only) or a timestamp (with a time).

    With ``fmt``, text (or integers such as 20210129) is read in that strptime format."""
    arr = _plain(arr)
    if pa.types.is_date(arr.type) or pa.types.is_timestamp(arr.type):
        return arr
    if fmt and pa.types.is_integer(arr.type):  # 20210129 with format = "%Y%m%d"
        arr = arr.cast(pa.string())
    if not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
        raise ColumnError(column, f"expected dates, found {arr.type} values; use keep or generalise instead")
    arr = pc.utf8_trim_whitespace(arr)
    arr = pc.if_else(pc.equal(arr, ""), pa.scalar(None, arr.type), arr)
    if fmt:
        out = pc.strptime(arr, format=fmt, unit="s", error_is_null=True)
        bad = pc.or_(pc.and_(pc.is_null(out), pc.is_valid(arr)), _rolled_over(arr, out, fmt))
        if pc.any(bad).as_py():
            row = int(pc.index(bad, True).as_py()) + 1
            raise ColumnError(column, f"not a date in format {fmt!r}; fix the source or the format", row)
        if "%H" not in fmt:
            out = out.cast(pa.date32())
        return out
    longest = pc.max(pc.utf8_length(arr)).as_py() or 0
    zoned = pc.any(pc.match_substring_regex(arr, r"(Z|[+-]\d\d:?\d\d)$")).as_py()
    target = pa.date32() if longest <= 10 else pa.timestamp("s", "UTC" if zoned else None)
    try:
        return arr.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        first_bad: int | None = None
        for i, v in enumerate(arr.to_pylist()):
            try:
                pa.array([v]).cast(target)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                first_bad = i + 1
                break
        raise ColumnError(
            column,
            "not an ISO date (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS); give format = '...' for other forms",
            first_bad,
        ) from None


def _rolled_over(arr: pa.Array, out: pa.Array, fmt: str) -> pa.Array:
    """Where Arrow's ``strptime`` read a day the month does not have (``31.02.2021``) as a later day (3 March):
    the values that do not print back as written are read once more by Python's, which refuses such a day
    (most print back, so only unpadded ``1.2.2021`` and the like take the slow path)."""
    again = pc.strftime(out, format=fmt)
    differs = pc.fill_null(pc.not_equal(again, arr), False)
    flags = np.zeros(len(arr), dtype=bool)
    for i in np.flatnonzero(differs.to_numpy(zero_copy_only=False)):
        try:
            dt.datetime.strptime(arr[int(i)].as_py(), fmt)
        except ValueError:
            flags[i] = True
    return pa.array(flags)


def wall_clock(arr: pa.Array, column: str, zone: str) -> pa.Array:
    """Times that carry a zone (a UTC offset in the text, or a Parquet timestamp with a zone) as their wall
    clock in ``zone``, without one; any other dates as they are.

    A whole-day shift keeps a time's UTC hour and offset, and an event at 08:00 local time is 07:00 UTC in
    winter and 06:00 in summer: each shifted time would still say whether its real date fell in summer
    time, and a patient's times on both sides of a change of the clocks narrow the patient's shift to a few
    days of the window. The wall clock is the same in both seasons."""
    arr = _plain(arr)
    if not pa.types.is_timestamp(arr.type) or arr.type.tz is None:
        return arr
    if not zone:
        raise ColumnError(
            column,
            "holds times with a UTC offset, which a shift by whole days keeps: an offset or UTC hour tells summer "
            "from winter time and so gives each patient's shift away. Set [workspace] time_zone in the site "
            "file to the zone the times were recorded in (such as Europe/Berlin): ingest then publishes each "
            "as its wall clock there, without an offset",
        )
    return pc.local_timestamp(arr.cast(pa.timestamp(arr.type.unit, zone)))


def shift_dates(arr: pa.Array, offsets: np.ndarray, column: str) -> pa.Array:
    """Move every date by its row's offset in days; intervals within a patient are kept exactly."""
    arr = _plain(arr)
    off = pa.array(offsets)
    if pa.types.is_date32(arr.type):
        return pc.add(arr.cast(pa.int32()), off.cast(pa.int32())).cast(pa.date32())
    if pa.types.is_date64(arr.type):
        arr = arr.cast(pa.timestamp("ms"))
    if pa.types.is_timestamp(arr.type):
        per_day = {"s": 86_400, "ms": 86_400_000, "us": 86_400_000_000, "ns": 86_400_000_000_000}[arr.type.unit]
        moved = pc.add(arr.cast(pa.int64()), pc.multiply(off.cast(pa.int64()), per_day))
        return moved.cast(arr.type)
    raise ColumnError(column, f"cannot shift values of type {arr.type}")


def row_offsets(patient_codes: np.ndarray, per_patient: np.ndarray) -> np.ndarray:
    return _take(per_patient, patient_codes) if len(per_patient) else np.zeros(len(patient_codes), dtype=np.int64)


def _numbers(arr: pa.Array, column: str) -> np.ndarray:
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        arr = pc.utf8_trim_whitespace(arr)
        arr = pc.if_else(pc.equal(arr, ""), pa.scalar(None, arr.type), arr)
        try:
            arr = arr.cast(pa.float64())
        except pa.ArrowInvalid:
            for i, v in enumerate(arr.to_pylist()):
                try:
                    float(v) if v is not None else None
                except ValueError:
                    raise ColumnError(column, "not a number", i + 1) from None
            raise
    elif not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
        raise ColumnError(column, f"expected numbers, found {arr.type}")
    numbers: np.ndarray = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
    return numbers


def _banded(values: np.ndarray, edges: list[int], open_top: bool, column: str) -> pa.Array:
    missing = np.isnan(values)
    low = np.nan_to_num(values, nan=edges[0])
    if (low < edges[0]).any():
        row = int(np.argmax(low < edges[0])) + 1
        raise ColumnError(column, f"below the lowest band edge {edges[0]}", row)
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), low, side="right") - 1
    labels = [f"{a}-{b - 1}" if b - 1 != a else f"{a}" for a, b in zip(edges, edges[1:], strict=False)]
    labels.append(f"{edges[-1]}+")
    if not open_top and (idx >= len(edges) - 1).any():
        row = int(np.argmax(idx >= len(edges) - 1)) + 1
        raise ColumnError(column, f"at or above the highest band edge {edges[-1]}", row)
    return _dictionary(np.where(missing, -1, idx), pa.array(labels))


def _row_of(codes: np.ndarray, e: ColumnError) -> ColumnError:
    """An error found among distinct values, re-pointed at the first row holding that value."""
    if e.row is None:
        return e
    row = int(np.argmax(codes == e.row - 1)) + 1
    return ColumnError(e.column, e.message, row)


def age_bands(
    arr: pa.Array | pa.ChunkedArray, column: str, *, width: int = 10, top: int = 90, edges: list[int] | None = None
) -> pa.Array:
    """Ages to bands ``40-49``; ``top`` and above become ``90+``. ``edges`` gives uneven bands instead."""
    codes, distinct = _codes(arr)  # band each distinct age once
    if not edges:
        edges = list(range(0, top, width)) + [top]
    try:
        banded = _banded(_numbers(distinct, column), list(edges), True, column)
    except ColumnError as e:
        raise _row_of(codes, e) from None
    index = banded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return _dictionary(np.where(codes < 0, -1, _take(index, codes)), banded.dictionary)


def years(arr: pa.Array | pa.ChunkedArray, column: str, *, width: int = 1, fmt: str = "") -> pa.Array:
    """Dates to their year (an integer) or, with ``width`` > 1, to spans of years ``1950-1959``."""
    dates = parse_dates(arr, column, fmt)
    y = pc.year(dates)
    if width == 1:
        return y.cast(pa.int32())
    v = y.cast(pa.float64()).to_numpy(zero_copy_only=False)
    lo = int(np.nanmin(v) // width * width) if np.isfinite(v).any() else 0
    hi = int(np.nanmax(v) // width * width + width) if np.isfinite(v).any() else width
    return _banded(v, list(range(lo, hi + 1, width)), False, column)


def prefixes(arr: pa.Array | pa.ChunkedArray, *, length: int = 2) -> pa.Array:
    """The first ``length`` characters (after trimming and removing inner spaces), e.g. postcode areas."""
    codes, values = _codes(arr)
    values = pc.replace_substring(_clean_text(values), " ", "")
    return _dictionary(*_recode(codes, pc.utf8_slice_codeunits(values, 0, length)))


def _distinct_per_group(groups: np.ndarray, patients: np.ndarray, ngroups: int, cap: int = 0) -> np.ndarray:
    """For each group code, how many distinct patient codes (-1: unknown, counted as one) occur with it.

    With ``cap``, counts need only be right below ``cap``: a group with at least ``cap`` times as many
    rows as any patient has surely has ``cap`` patients, and is not counted exactly.
    """
    if cap:
        rows = np.bincount(groups, minlength=ngroups)
        most = int(np.bincount(patients + 1).max(initial=1))
        sure = rows >= cap * most
        if sure.any():
            keep = ~sure[groups]
            counts = _distinct_per_group(groups[keep], patients[keep], ngroups)
            counts[sure] = cap
            return counts
    width = (int(patients.max(initial=0)) + 2 + 7) // 8 * 8  # whole uint64 words per group
    pairs = groups * width + (patients + 1)
    if ngroups * width <= 64_000_000:  # a bitmap of seen pairs beats hashing them
        seen = np.zeros(ngroups * width, dtype=np.bool_)
        seen[pairs] = True
        if hasattr(np, "bitwise_count"):  # numpy >= 2: count 8 flags at a time
            return np.asarray(
                np.bitwise_count(seen.view(np.uint64)).reshape(ngroups, width // 8).sum(axis=1, dtype=np.int64)
            )
        return np.asarray(seen.reshape(ngroups, width).sum(axis=1))
    return np.bincount(pd.unique(pairs) // width, minlength=ngroups)


def rare_to_other(
    arr: pa.Array | pa.ChunkedArray, *, min_count: int, other: str = "other", patient_codes: np.ndarray | None = None
) -> pa.Array:
    """Categories held by fewer than ``min_count`` patients (rows, without a patient id) become ``other``."""
    codes, values = _codes(arr)
    if not pa.types.is_string(values.type):
        values = values.cast(pa.string())
    valid = codes >= 0
    if patient_codes is not None:
        counts = _distinct_per_group(codes[valid], patient_codes[valid], len(values), cap=min_count)
    else:
        counts = np.bincount(codes[valid], minlength=len(values))
    values = pc.if_else(pa.array(counts < min_count), pa.scalar(other), values)
    return _dictionary(*_recode(codes, values))


def k_anonymity(
    table: pa.Table, columns: list[str], patient_codes: np.ndarray | None = None
) -> tuple[int, dict[str, object]]:
    """The smallest group size over ``columns`` (distinct patients per group when ids are given).

    Returns ``(k, smallest_group)`` where ``smallest_group`` maps each column to its value in that group.
    Missing values form their own group.
    """
    if table.num_rows == 0:
        return 0, {}
    key = np.zeros(table.num_rows, dtype=np.int64)
    dictionaries = []
    size = 1
    for c in columns:
        codes, values = _codes(table.column(c))
        n = len(values) + 1
        size *= n
        if size >= 2**62:
            raise ValueError(f"too many quasi-identifier combinations over {columns}; generalise them first")
        key = key * n + (codes + 1)
        dictionaries.append((values, n))
    groups, key = np.unique(key, return_inverse=True) if size > 4 * table.num_rows else (None, key)
    ngroups = len(groups) if groups is not None else size
    if patient_codes is not None:
        counts = _distinct_per_group(key, patient_codes, ngroups)
    else:
        counts = np.bincount(key, minlength=ngroups)
    present = np.flatnonzero(counts)
    g = int(present[np.argmin(counts[present])])
    k = int(counts[g])
    code = int(groups[g]) if groups is not None else g
    smallest: dict[str, object] = {}
    for c, (values, n) in zip(reversed(columns), reversed(dictionaries), strict=True):
        code, v = divmod(code, n)
        smallest[c] = values[v - 1].as_py() if v else None
    return k, {c: smallest[c] for c in columns}


def _value_order(values: pa.Array) -> np.ndarray:
    """Positions of ``values`` in ascending order (text by its bytes)."""
    order = _fixed_width_order(values)
    if order is None:
        order = pc.sort_indices(values).to_numpy(zero_copy_only=False).astype(np.int64)
    return order


def in_order_of_appearance(arr: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """A dictionary-encoded column whose dictionary lists its values in the order rows first hold them.

    A source's dictionary lists values in the order the source met them, or as a warehouse sorted them
    (record numbers); as it came, a published dictionary would show that order. Once the rows are in
    :func:`keyed_row_order`, the order they first appear in comes from the published rows alone; it is
    also the order Parquet gives a column it encodes itself, and the one a reader of the file meets them
    in. Call after :func:`used_values_only`.
    """
    if not pa.types.is_dictionary(arr.type):
        return arr
    single = _single(arr)
    indices = single.indices
    codes = indices.fill_null(0) if indices.null_count else indices
    codes = np.asarray(codes.to_numpy(zero_copy_only=False), dtype=np.int32)
    present = codes[pc.is_valid(indices).to_numpy(zero_copy_only=False)] if indices.null_count else codes
    seen = np.asarray(pd.unique(present), dtype=np.int32)
    if len(seen) == len(single.dictionary) and (seen == np.arange(len(seen))).all():
        return single
    rank = np.zeros(len(single.dictionary), dtype=np.int32)
    rank[seen] = np.arange(len(seen), dtype=np.int32)
    mask = pc.is_null(indices).to_numpy(zero_copy_only=False) if indices.null_count else None
    new = pa.array(rank.take(codes, mode="clip"), type=pa.int32(), mask=mask)
    return pa.DictionaryArray.from_arrays(new, single.dictionary.take(pa.array(seen)))


def _fixed_width_words(values: pa.Array) -> np.ndarray | None:
    """Text values all of one length in bytes (pseudonyms), but for a prefix all share, as big-endian
    64-bit words, one row per value (zero-padded); None for other values."""
    n = len(values)
    if not pa.types.is_string(values.type) or values.null_count or n < 2:
        return None
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)[values.offset : values.offset + n + 1]
    width = int(offsets[1] - offsets[0])
    if not 0 < width <= 64 or int(offsets[-1] - offsets[0]) != width * n or (np.diff(offsets) != width).any():
        return None
    data = np.frombuffer(values.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]].reshape(n, width)
    differ = np.flatnonzero((data != data[0]).any(axis=0))  # a prefix all share ("P-") orders nothing
    data = data[:, differ[0] :] if len(differ) else data[:, :0]
    padded = np.zeros((n, max(1, (data.shape[1] + 7) // 8) * 8), dtype=np.uint8)
    padded[:, : data.shape[1]] = data
    words: np.ndarray = padded.view(">u8").astype(np.uint64)
    return words


def _fixed_width_order(values: pa.Array) -> np.ndarray | None:
    """The ascending order of text values all of one length in bytes (pseudonyms), as big-endian words
    sorted with numpy: a third of the time Arrow takes to sort them as text. None for other values."""
    words = _fixed_width_words(values)
    if words is None:
        return None
    order: np.ndarray = np.argsort(words[:, 0])
    head = words[order, 0]
    if words.shape[1] > 1 and (head[1:] == head[:-1]).any():  # first 8 bytes alike: all of them decide
        order = np.lexsort(words.T[::-1])
    return order


_U64 = np.uint64


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, in place: every bit of the result depends on every bit of ``z``."""
    z ^= z >> _U64(30)
    z *= _U64(0xBF58476D1CE4E5B9)
    z ^= z >> _U64(27)
    z *= _U64(0x94D049BB133111EB)
    z ^= z >> _U64(31)
    return z


_NULL_WORD = _U64(0x6E756C6C6E756C6C)  # what a missing value reads as


def _words(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """One uint64 per row that depends on the row's value alone (never on where the row is).

    Dictionary columns (holding only used values) give the value's rank among the dictionary's values
    in ascending order, whatever order the dictionary lists them in (text of one width, such as
    pseudonyms, its bytes mixed instead); other text, binary and nested values
    likewise among the column's distinct values; numbers, dates and times give their bits. Missing
    values read as one fixed word.
    """
    arr = _single(arr)
    t = arr.type
    if not pa.types.is_dictionary(t):
        if pa.types.is_floating(t):
            bits = arr.cast(pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False).view(np.uint64)
        elif pa.types.is_integer(t) or pa.types.is_boolean(t):
            bits = arr.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False).view(np.uint64)
        elif pa.types.is_temporal(t) and t.bit_width in (32, 64):
            storage = pa.int32() if t.bit_width == 32 else pa.int64()
            bits = arr.view(storage).cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False).view(np.uint64)
        else:
            try:
                enc = arr.dictionary_encode()
            except (pa.ArrowNotImplementedError, pa.ArrowInvalid):  # nested values: rank their text form
                enc = pa.array([None if v is None else repr(v) for v in arr.to_pylist()], pa.string())
                enc = enc.dictionary_encode()
            arr = used_values_only(enc)
            t = arr.type
        if not pa.types.is_dictionary(t):
            out = np.array(bits, dtype=np.uint64, copy=True)
            if arr.null_count:
                out[~pc.is_valid(arr).to_numpy(zero_copy_only=False)] = _NULL_WORD
            return out
    words = _fixed_width_words(arr.dictionary)
    if words is not None:  # pseudonyms: their bytes, mixed, need no sort
        rank = np.zeros(len(words), dtype=np.uint64)
        for c in range(words.shape[1]):
            rank = _mix(rank ^ words[:, c])
    else:
        order = _value_order(arr.dictionary)
        rank = np.empty(len(order), dtype=np.uint64)
        rank[order] = np.arange(len(order), dtype=np.uint64)
    codes = _indices(arr)
    out = _take(rank, codes) if len(rank) else np.zeros(len(codes), dtype=np.uint64)
    if (codes < 0).any():
        out[codes < 0] = _NULL_WORD
    return out


def keyed_row_order(table: pa.Table, key: bytes) -> np.ndarray:
    """A permutation of ``table``'s rows that depends on the rows' values and ``key`` alone.

    Each row gets a 64-bit keyed hash of its values (:func:`_words`, column by column, each column with
    its own keyed odd multiplier, then SplitMix64's finaliser) and rows are sorted by it. The source's
    row order enters nowhere: the same rows in any order give the same permutation of the same content,
    a re-ingest gives the same order, and another key (another project) an unrelated one. Rows of equal
    values are interchangeable; rows that differ have equal hashes with chance about 2**-64 a pair.
    Dictionaries must hold only used values (:func:`used_values_only`).
    """
    n = table.num_rows
    seed = hashlib.blake2b(key=key, digest_size=16, person=b"pt-row-order").digest()
    h = np.full(n, np.frombuffer(seed[:8], dtype="<u8")[0], dtype=np.uint64)
    salt = np.frombuffer(seed[8:], dtype="<u8")[0]
    for j, column in enumerate(table.columns):
        word = hashlib.blake2b(j.to_bytes(4, "little"), key=key, digest_size=8, person=b"pt-row-column")
        multiplier = np.frombuffer(word.digest(), dtype="<u8")[0] | _U64(1)
        h ^= _words(column)
        h *= multiplier
        h ^= h >> _U64(29)
    h ^= salt
    order: np.ndarray = np.argsort(_mix(h))  # ties: rows of equal values, whose order changes nothing
    return order


def in_keyed_order(table: pa.Table, key: bytes) -> tuple[pa.Table, np.ndarray]:
    """``table`` as published: rows in :func:`keyed_row_order`, dictionaries cut to used values and
    listing them :func:`in_order_of_appearance`.

    Returns the table and the permutation (published row i is row ``order[i]`` of ``table``), so a caller
    can carry row-aligned arrays (patient codes) along.
    """
    table = used_values_only_table(table)
    order = keyed_row_order(table, key)
    table = table.take(pa.array(order))
    for i, f in enumerate(table.schema):
        if pa.types.is_dictionary(f.type):
            table = table.set_column(i, f.name, in_order_of_appearance(table.column(i)))
    return table, order
