"""Does an undeclared column look like a direct identifier? By its name, then by a sample of its values.

The sample is up to 2000 non-missing values spread evenly over the whole column (every value of a
smaller column), so its cost does not grow with the table, and an identifying column is seen wherever
its values sit in the file. A sample can still miss a column whose identifying values are rare (most
rows harmless): the rules need most sampled values to match. A column of a date or time type is not
sampled: any value anywhere refuses it. Dates written as text or numbers are sampled like the rest:
ISO 8601, 29.01.2021, 29/01/2021, 01/29/2021, 29-01-2021, 2021/01/29, 20210129 (text or integer),
29 Jan 2021, Jan 29, 2021 (English or German month names), each a real calendar day of 1850-2100.

Strict mode (the default) refuses such a column until the spec says what happens to it. The checks err
on the side of refusing: a false alarm costs one line in the spec, a miss costs a patient's identity.
"""

from __future__ import annotations

import datetime as dt
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
        r"^(id|identifier|encounter|subject|medicalrecordnumber)$"
        r"|(^|_)(mrn(_?(number|no|nr))?|medical_record(_number)?|record_?(number|no)|patient_?(id|number|no|nr)"
        r"|pat_?id|pid|case_?(id|number|no)|fall_?(nummer|nr)|encounter_?id|visit_?id|admission_?id"
        r"|hosp(ital)?_?(number|no|nr|id)|krankenversichertennummer)$",
    ),
    ("a birth date", r"(^|_)(date_of_birth|birth_?(date|day)|dob|geburts_?datum)$"),
]

DATES = "real dates (unshifted, they link records to real events)"

# Real dates in the forms people write them, each with the strptime format that reads it (the format a
# date_shift rule needs). Years 1850-2100 only, and the day must exist: 20211345 is not a date.
_MONTHS = {
    **dict.fromkeys(("jan", "january", "januar", "jän", "jänner"), 1),
    **dict.fromkeys(("feb", "february", "februar"), 2),
    **dict.fromkeys(("mar", "march", "mär", "märz", "maerz"), 3),
    **dict.fromkeys(("apr", "april"), 4),
    **dict.fromkeys(("may", "mai"), 5),
    **dict.fromkeys(("jun", "june", "juni"), 6),
    **dict.fromkeys(("jul", "july", "juli"), 7),
    **dict.fromkeys(("aug", "august"), 8),
    **dict.fromkeys(("sep", "sept", "september"), 9),
    **dict.fromkeys(("oct", "october", "okt", "oktober"), 10),
    **dict.fromkeys(("nov", "november"), 11),
    **dict.fromkeys(("dec", "december", "dez", "dezember"), 12),
}
_TIME = r"(?:[T ]\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?"
_DATE_FORMS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(?P<y>\d{4})-(?P<m>\d{1,2})-(?P<d>\d{1,2})" + _TIME + r"(?:Z|[+-]\d{2}:?\d{2})?"), ""),
    (re.compile(r"(?P<d>\d{1,2})\.(?P<m>\d{1,2})\.(?P<y>\d{4})" + _TIME), "%d.%m.%Y"),
    (re.compile(r"(?P<d>\d{1,2})/(?P<m>\d{1,2})/(?P<y>\d{4})" + _TIME), "%d/%m/%Y"),
    (re.compile(r"(?P<m>\d{1,2})/(?P<d>\d{1,2})/(?P<y>\d{4})" + _TIME), "%m/%d/%Y"),
    (re.compile(r"(?P<d>\d{1,2})-(?P<m>\d{1,2})-(?P<y>\d{4})" + _TIME), "%d-%m-%Y"),
    (re.compile(r"(?P<y>\d{4})[/.](?P<m>\d{1,2})[/.](?P<d>\d{1,2})" + _TIME), "%Y/%m/%d"),
    (re.compile(r"(?P<y>\d{4})(?P<m>\d{2})(?P<d>\d{2})"), "%Y%m%d"),
    (re.compile(r"(?i)(?P<d>\d{1,2}) (?P<mon>[a-z]{3}) (?P<y>\d{4})"), "%d %b %Y"),
    (re.compile(r"(?i)(?P<d>\d{1,2})-(?P<mon>[a-z]{3})-(?P<y>\d{4})"), "%d-%b-%Y"),
    (re.compile(r"(?i)(?P<mon>[a-z]{3}) (?P<d>\d{1,2}), (?P<y>\d{4})"), "%b %d, %Y"),
    # other ways with a month's name (29. Januar 2021, 29th January 2021): no format to suggest
    (re.compile(r"(?i)(?P<d>\d{1,2})(?:st|nd|rd|th)?\.?[ -](?P<mon>[a-zä]{3,9})\.?[ -](?P<y>\d{4})" + _TIME), "?"),
    (re.compile(r"(?i)(?P<mon>[a-zä]{3,9})\.? (?P<d>\d{1,2})(?:st|nd|rd|th)?,? (?P<y>\d{4})" + _TIME), "?"),
]
_EN_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")  # what %b reads

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
    (DATES, re.compile(r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?)?"), False),
    ("person names", re.compile(r"[A-ZÄÖÜ][a-zäöüßéèç'-]+,?(\s+[A-ZÄÖÜ][a-zäöüßéèç'.-]+){1,3}"), True),
    # a source system's own identifiers (FHIR resource ids and references): they link back to its records
    (
        "record identifiers (UUIDs)",
        re.compile(r"(?i)(\w+/)?[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"),
        True,
    ),
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


def _date_forms(value: str) -> list[str]:
    """The strptime formats (one "" for ISO 8601) in which ``value`` is a real calendar date."""
    out = []
    for pattern, fmt in _DATE_FORMS:
        m = pattern.fullmatch(value)
        if m is None:
            continue
        g = m.groupdict()
        month = _MONTHS.get(g["mon"].lower()) if g.get("mon") else int(g["m"])
        if month is None or ("%b" in fmt and g["mon"].lower() not in _EN_MONTHS):
            continue
        try:
            day = dt.date(int(g["y"]), month, int(g["d"]))
        except ValueError:
            continue
        if 1850 <= day.year <= 2100:
            out.append(fmt)
    return out


def _dates(values: list[tuple[int, str]]) -> tuple[int, str] | None:
    """(first row, format) if most values are real dates; the format that reads most of them."""
    counts: dict[str, int] = {}
    first, hits = -1, 0
    for i, v in values:
        forms = _date_forms(v)
        if forms:
            first = i if first < 0 else first
            hits += 1
        for f in forms:
            counts[f] = counts.get(f, 0) + 1
    if hits < SHARE * len(values) or not hits:
        return None
    return first, max(counts, key=lambda f: (counts[f], f != "?"))


def date_format(arr: pa.Array | pa.ChunkedArray) -> str | None:
    """The strptime format most sampled values of a column of real dates are written in: what a date_shift
    rule for the column says. "" for ISO 8601 (no format needed), "?" for a form without a format to
    suggest, None when the values are not mostly real dates."""
    typ = arr.type.value_type if pa.types.is_dictionary(arr.type) else arr.type
    if pa.types.is_date(typ) or pa.types.is_timestamp(typ):
        return ""
    examined = _examinable(arr)
    if isinstance(examined, str):
        return None
    arr, typ = examined, examined.type
    if not (pa.types.is_integer(typ) or pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        return None
    sample, rows = _sample(arr)
    values = [(int(rows[i]), str(v).strip()) for i, v in enumerate(sample.to_pylist()) if str(v).strip()]
    found = _dates(values) if values else None
    return found[1] if found else None


def _varied(n_distinct: int, n: int) -> bool:
    """Identifiers repeat (one patient, many rows) but take many values; categories take few."""
    return n_distinct >= 20 or n_distinct >= 0.25 * n


def _examinable(arr: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray | str:
    """The column in a type the rules read: whole numbers written as floats (an integer column with one
    missing value, as pandas writes it) as integers; text stored as bytes (as Spark and Hive write it) as
    text; text as large or view text as text. Numbers with fractions, booleans and times of day as they are
    (no identifier is written so). For a type no rule can read (lists, structs, maps, bytes that are not
    UTF-8 text), what to call it: strict mode refuses what it cannot examine."""
    typ = arr.type.value_type if pa.types.is_dictionary(arr.type) else arr.type
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(typ)
    if pa.types.is_floating(typ) or pa.types.is_decimal(typ):
        values = arr.cast(pa.float64()).drop_null()
        finite = pc.is_finite(values)
        whole = values.filter(finite)
        if len(whole) and pc.all(pc.equal(pc.floor(whole), whole)).as_py() and pc.all(finite).as_py():
            if pc.max(pc.abs(whole)).as_py() < 2**53:
                return arr.cast(pa.float64()).cast(pa.int64())
        return arr
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_fixed_size_binary(typ):
        try:
            return arr.cast(pa.binary()).cast(pa.string())  # Arrow checks the UTF-8
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return "bytes that are not UTF-8 text"
    if pa.types.is_string_view(typ):
        return arr.cast(pa.string())
    if pa.types.is_nested(typ):
        return f"nested values ({typ})"
    return arr


def by_content(arr: pa.Array | pa.ChunkedArray) -> tuple[str, int] | None:
    """(what, first matching sampled row, 1-based) if most sampled values look like direct identifiers, or if
    the column is of a type the rules cannot read."""
    typ = arr.type.value_type if pa.types.is_dictionary(arr.type) else arr.type
    if pa.types.is_date(typ) or pa.types.is_timestamp(typ):  # any real date at all, anywhere
        valid = pc.is_valid(arr)
        return (DATES, 1 + int(pc.index(valid, True).as_py())) if pc.any(valid).as_py() else None
    examined = _examinable(arr)
    if isinstance(examined, str):
        valid = pc.is_valid(arr)
        if not pc.any(valid).as_py():
            return None
        return f"{examined}, which strict mode cannot examine", 1 + int(pc.index(valid, True).as_py())
    arr = examined
    typ = arr.type
    if not (pa.types.is_integer(typ) or pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        return None
    arr, rows = _sample(arr)
    if pa.types.is_integer(arr.type):
        if len(arr) and pc.max(arr).as_py() >= 18500101:  # dates as numbers: 20210129
            found = _dates([(int(rows[i]), str(v)) for i, v in enumerate(arr.to_pylist())])
            if found:
                return DATES, found[0] + 1
        # record numbers repeat in a long table (a patient's many rows) as much as text identifiers do
        if len(arr) >= 5 and pc.min(arr).as_py() >= 100_000 and _varied(pc.count_distinct(arr).as_py(), len(arr)):
            return "record numbers", 1 + int(rows[0])
        return None
    values = [(int(rows[i]), v.strip()) for i, v in enumerate(arr.to_pylist()) if v.strip()]
    if not values:
        return None
    varied = _varied(len({v for _, v in values}), len(values))
    found = _dates(values)  # before the other rules: 01.02.2021 would pass for a phone number
    if found:
        return DATES, found[0] + 1
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
