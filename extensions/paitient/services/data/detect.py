"""Does an undeclared column look like a direct identifier? By its name, then by a sample of its values.

The sample is up to 2000 non-missing values spread evenly over the whole column (every value of a
smaller column), so its cost does not grow with the table, and an identifying column is seen wherever
its values sit in the file. A sample can still miss a column whose identifying values are rare (most
rows harmless): the rules need most sampled values to match. Dates are not sampled: any real date
anywhere refuses the column.

Strict mode (the default) refuses such a column until the spec says what happens to it. The checks err
on the side of refusing: a false alarm costs one line in the spec, a miss costs a patient's identity.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SAMPLE = 2000
SHARE = 0.6  # of the sampled non-missing values must match

_NAME_RULES: list[tuple[str, str]] = [
    (
        "a person's name",
        r"^(names?|full_?name|display_?name|family|given|surname|forename)$"
        r"|(^|_)(first|last|given|family|middle|maiden|patient|person|sur|fore|vor|nach|familien|geburts)_?names?$",
    ),
    ("an email address", r"(^|_)e_?mail(_?address)?$|(^|_)mail_?address$"),
    (
        "a phone number",
        r"(^|_)((tele)?phone|tel|mobile|cell_?phone|fax|telefon|telefonnummer|handy)(_?(number|no|nr))?$",
    ),
    (
        "a street address",
        r"(^|_)(address|street|strasse|straße|adresse|addr)(_?(line|\d))*(_\d)?$"
        r"|(^|_)(house|haus)_?(number|no|nr|nummer)$|(^|_)address_line_?\d?$",
    ),
    (
        "an insurance or national number",
        r"(^|_)(ssn|social_security(_number)?|nhs(_?(number|no))?|ni_?number"
        r"|national_insurance(_number)?|insurance_?(number|no|id|nr)|kvnr|versicherten_?nummer|sv_?nummer)$",
    ),
    (
        "a record number",
        r"^id$|(^|_)(mrn|medical_record(_number)?|record_?(number|no)|patient_?(id|number|no|nr)"
        r"|pat_?id|pid|case_?(id|number|no)|fall_?(nummer|nr)|encounter_?id|visit_?id|admission_?id)$",
    ),
    ("a birth date", r"(^|_)(date_of_birth|birth_?(date|day)|dob|geburts_?datum)$"),
]

_DATES = "real dates (unshifted, they link records to real events)"

_CONTENT_RULES: list[tuple[str, re.Pattern[str], bool]] = [
    # (what, pattern, needs mostly distinct values)
    ("email addresses", re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"), False),
    (
        "insurance numbers",
        re.compile(
            r"[A-Z]\d{9}"  # German health insurance (KVNR)
            r"|\d{2}\s?\d{6}\s?[A-Z]\s?\d{3}"  # German social insurance
            r"|[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]\s?\d{2}\s?\d{2}\s?\d{2}\s?[A-D]"  # UK National Insurance
            r"|\d{3}[ -]\d{3}[ -]\d{4}"  # UK NHS number, spaced
        ),
        False,
    ),
    ("record numbers", re.compile(r"(?i)((mrn|pid|pat|kis|case|fall)[-_: ]?)?[A-Z]{0,3}[-_]?\d{6,12}"), True),
    ("phone numbers", re.compile(r"(\+|00|0)\d[\d ()/.-]{5,}\d"), False),
    (
        "street addresses",
        re.compile(
            r"(?i)(\d+[a-z]?,?\s+(\w+\s+){0,3}(street|st|road|rd|avenue|ave|lane|ln|drive|dr|way|close|court|place"
            r"|square|crescent|terrace|gardens)\.?\b.*"
            r"|.*\w(straße|strasse|str\.|weg|allee|platz|gasse|ring|damm|ufer)\s*\d+[a-z]?\b.*)"
        ),
        False,
    ),
    (_DATES, re.compile(r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?)?"), False),
    ("person names", re.compile(r"[A-ZÄÖÜ][a-zäöüßéèç'-]+,?(\s+[A-ZÄÖÜ][a-zäöüßéèç'.-]+){1,3}"), True),
]


def _norm(column: str) -> str:
    s = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", column)
    return re.sub(r"[^0-9a-zäöüß]+", "_", s.lower()).strip("_")


def by_name(column: str) -> str | None:
    """What the column's name suggests it holds, if that is a direct identifier."""
    n = _norm(column)
    for what, pattern in _NAME_RULES:
        if re.search(pattern, n):
            return what
    return None


def _sample(arr: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """Up to ``SAMPLE`` non-missing values spread evenly over the whole column (all of them when there
    are fewer), and their rows (0-based). Spread, not the first rows: a column that is empty or harmless
    at the top of the file but identifying further down is still seen."""
    if arr.null_count == 0:
        rows = np.arange(len(arr))
    else:
        rows = np.flatnonzero(pc.is_valid(arr).to_numpy(zero_copy_only=False))
    if len(rows) > SAMPLE:
        rows = rows[np.linspace(0, len(rows) - 1, SAMPLE).astype(np.int64)]
    taken = arr.take(pa.array(rows))
    if isinstance(taken, pa.ChunkedArray):
        taken = taken.combine_chunks()
    if pa.types.is_dictionary(taken.type):
        taken = taken.cast(taken.type.value_type)
    return taken, rows


def _varied(n_distinct: int, n: int) -> bool:
    """Identifiers repeat (one patient, many rows) but take many values; categories take few."""
    return n_distinct >= 20 or n_distinct >= 0.25 * n


def by_content(arr: pa.Array | pa.ChunkedArray) -> tuple[str, int] | None:
    """(what, first matching sampled row, 1-based) if most sampled values look like direct identifiers."""
    typ = arr.type.value_type if pa.types.is_dictionary(arr.type) else arr.type
    if pa.types.is_date(typ) or pa.types.is_timestamp(typ):  # any real date at all, anywhere
        valid = pc.is_valid(arr)
        return (_DATES, 1 + int(pc.index(valid, True).as_py())) if pc.any(valid).as_py() else None
    if not (pa.types.is_integer(typ) or pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        return None
    arr, rows = _sample(arr)
    if pa.types.is_integer(arr.type):
        # record numbers repeat in a long table (a patient's many rows) as much as text identifiers do
        if len(arr) >= 5 and pc.min(arr).as_py() >= 100_000 and _varied(pc.count_distinct(arr).as_py(), len(arr)):
            return "record numbers", 1 + int(rows[0])
        return None
    values = [(int(rows[i]), v.strip()) for i, v in enumerate(arr.to_pylist()) if v.strip()]
    if not values:
        return None
    varied = _varied(len({v for _, v in values}), len(values))
    for what, pattern, needs_varied in _CONTENT_RULES:
        if needs_varied and not varied:
            continue
        hits = [
            i
            for i, v in values
            if pattern.fullmatch(v) and (what != "phone numbers" or sum(c.isdigit() for c in v) >= 7)
        ]
        if len(hits) >= SHARE * len(values):
            return what, hits[0] + 1
    words = sum(len(v.split()) for _, v in values) / len(values)
    if words >= 6 and varied:
        return "free text (which can hold names, dates and places)", values[0][0] + 1
    return None
