"""Each column transform on its own: pure functions, Arrow in, Arrow out."""

import datetime as dt
import re

import numpy as np
import pyarrow as pa
import pytest

from paitient.rules import pseudonyms as tf
from paitient.services.data import keys
from paitient.services.data.errors import ColumnError

KEY_A = keys.project_key(b"m" * 32, "oncology")
KEY_B = keys.project_key(b"m" * 32, "cardiometabolic")


def plain(arr):
    return arr.cast(arr.type.value_type).to_pylist() if pa.types.is_dictionary(arr.type) else arr.to_pylist()


def test_pseudonyms_are_keyed_readable_and_map_repeats_to_one():
    out = plain(tf.pseudonymise(pa.array(["000123", " 000123 ", "000124", None, ""]), KEY_A))
    assert out[0] == out[1] != out[2]
    assert out[3] is None and out[4] is None
    assert all(re.fullmatch(r"P-[A-Z2-7]{16}", p) for p in out[:3])
    # leading zeros are part of the identifier: 123 is another patient than 000123
    assert plain(tf.pseudonymise(pa.array(["123"]), KEY_A))[0] != out[0]


def test_pseudonyms_differ_across_project_keys_and_domains_and_are_stable():
    ids = pa.array(["000123", "000124"])
    a1, a2 = plain(tf.pseudonymise(ids, KEY_A)), plain(tf.pseudonymise(ids, KEY_A))
    b = plain(tf.pseudonymise(ids, KEY_B))
    case = plain(tf.pseudonymise(ids, KEY_A, domain="case", prefix="C-"))
    assert a1 == a2
    assert set(a1).isdisjoint(b)
    assert all(c.startswith("C-") for c in case) and {c[2:] for c in case}.isdisjoint({p[2:] for p in a1})


def test_integer_identifiers_use_their_text_form():
    assert plain(tf.pseudonymise(pa.array([123]), KEY_A)) == plain(tf.pseudonymise(pa.array(["123"]), KEY_A))


def test_shift_days_stay_in_window_never_zero_and_are_keyed():
    ids = [f"{i:06d}" for i in range(5000)]
    a = tf.shift_days(ids, KEY_A, 30)
    assert a.min() >= -30 and a.max() <= 30 and not (a == 0).any()
    assert len(set(a.tolist())) == 60  # every offset in the window occurs
    assert (tf.shift_days(ids, KEY_A, 30) == a).all()
    assert (tf.shift_days(ids, KEY_B, 30) != a).mean() > 0.9


def test_shifts_in_whole_weeks_keep_the_weekday_and_use_every_week_of_the_window():
    ids = [f"{i:06d}" for i in range(5000)]
    w = tf.shift_days(ids, KEY_A, 30, unit=7)  # 30 days hold 4 whole weeks either way
    assert not (w % 7).any() and not (w == 0).any()
    assert sorted(set(w.tolist())) == [-28, -21, -14, -7, 7, 14, 21, 28]
    assert (tf.shift_days(ids, KEY_A, 30, unit=7) == w).all()
    with pytest.raises(ValueError, match="a window of 6 days holds no whole offset of 7 days"):
        tf.shift_days(ids, KEY_A, 6, unit=7)


def test_shift_dates_moves_each_patient_by_one_offset():
    dates = pa.array([dt.date(2020, 1, 10), dt.date(2020, 3, 15), dt.date(2021, 1, 1)], pa.date32())
    out = tf.shift_dates(dates, np.array([5, 5, -7]), "d").to_pylist()
    assert out == [dt.date(2020, 1, 15), dt.date(2020, 3, 20), dt.date(2020, 12, 25)]
    ts = pa.array([dt.datetime(2020, 1, 1, 10, 30)], pa.timestamp("us"))
    assert tf.shift_dates(ts, np.array([-1]), "t").to_pylist() == [dt.datetime(2019, 12, 31, 10, 30)]


def test_parse_dates_iso_zoned_and_formats():
    assert tf.parse_dates(pa.array(["2020-01-02", None, " "]), "d").to_pylist() == [dt.date(2020, 1, 2), None, None]
    ts = tf.parse_dates(pa.array(["2020-01-02T10:00:00+02:00"]), "d")
    assert ts.type == pa.timestamp("s", "UTC") and ts[0].as_py().hour == 8
    assert tf.parse_dates(pa.array(["02.01.2020"]), "d", "%d.%m.%Y").to_pylist() == [dt.date(2020, 1, 2)]


@pytest.mark.parametrize("fmt", ["", "%d.%m.%Y"])
def test_parse_dates_names_the_bad_row_not_the_value(fmt):
    good = "2020-01-02" if not fmt else "02.01.2020"
    with pytest.raises(ColumnError) as e:
        tf.parse_dates(pa.array([good, good, "31.31.2020x"]), "diagnosed", fmt)
    assert e.value.row == 3 and e.value.column == "diagnosed"
    assert "31.31" not in str(e.value)


@pytest.mark.parametrize(
    ("fmt", "good", "impossible"),
    [
        ("%d.%m.%Y", "1.2.2021", "31.02.2021"),
        ("%Y%m%d", "20210129", "20210229"),
        ("%d/%m/%Y %H:%M", "01/02/2021 10:00", "30/02/2021 10:00"),
    ],
)
def test_a_day_the_month_does_not_have_is_refused_not_moved_to_the_next_month(fmt, good, impossible):
    assert tf.parse_dates(pa.array([good, good]), "admitted", fmt)[0].as_py().day in (1, 29)
    with pytest.raises(ColumnError) as e:
        tf.parse_dates(pa.array([good, impossible, good]), "admitted", fmt)
    assert e.value.row == 2 and "not a date in format" in str(e.value)


def test_age_bands_width_top_and_edges():
    ages = pa.array([0, 9, 10, 45.5, 89, 90, 104, None])
    assert plain(tf.age_bands(ages, "age")) == ["0-9", "0-9", "10-19", "40-49", "80-89", "90+", "90+", None]
    assert plain(tf.age_bands(ages, "age", edges=[0, 18, 65])) == [
        "0-17",
        "0-17",
        "0-17",
        "18-64",
        "65+",
        "65+",
        "65+",
        None,
    ]
    assert plain(tf.age_bands(pa.array(["34", " 61 "]), "age", width=50)) == ["0-49", "50-89"]


def test_age_bands_refuse_text_and_values_below_the_first_edge_by_row():
    with pytest.raises(ColumnError) as e:
        tf.age_bands(pa.array(["34", "forty", "50"]), "age")
    assert e.value.row == 2 and "not a number" in str(e.value)
    with pytest.raises(ColumnError) as e:
        tf.age_bands(pa.array([30, 30, 12, 40]), "age", edges=[18, 65])
    assert e.value.row == 3 and "below the lowest band edge 18" in str(e.value)


def test_prefixes_trim_and_drop_inner_spaces():
    assert plain(tf.prefixes(pa.array(["10115", " SW1A 1AA", None, "  "]), length=4)) == ["1011", "SW1A", None, None]


def test_rare_to_other_counts_rows_or_distinct_patients():
    cats = pa.array(["C50", "C50", "C50", "E11", "E11", None])
    assert plain(tf.rare_to_other(cats, min_count=3)) == ["C50", "C50", "C50", "other", "other", None]
    # one patient with three C50 rows is still one patient: C50 is rare by patients
    patients = np.array([0, 0, 0, 1, 2, 3])
    assert plain(tf.rare_to_other(cats, min_count=2, patient_codes=patients)) == [
        "other",
        "other",
        "other",
        "E11",
        "E11",
        None,
    ]


def test_years_and_year_spans():
    dates = pa.array(["1951-03-02", "1959-12-31", "1960-01-01"])
    assert tf.years(dates, "born").to_pylist() == [1951, 1959, 1960]
    assert plain(tf.years(dates, "born", width=10)) == ["1950-1959", "1950-1959", "1960-1969"]


def test_k_anonymity_by_rows_and_by_patients_and_missing_as_a_group():
    t = pa.table({"age": ["40-49", "40-49", "50-59", "50-59", None], "sex": ["F", "F", "M", "M", "M"]})
    assert tf.k_anonymity(t, ["age", "sex"]) == (1, {"age": None, "sex": "M"})
    t2 = pa.table({"age": ["40-49"] * 3 + ["50-59"] * 2, "sex": ["F"] * 3 + ["M"] * 2})
    assert tf.k_anonymity(t2, ["age", "sex"])[0] == 2
    # three rows of one patient make a group of one patient
    assert tf.k_anonymity(t2, ["age", "sex"], np.array([7, 7, 7, 1, 2])) == (1, {"age": "40-49", "sex": "F"})
    # dictionary-coded columns (what the transforms produce) count the same
    coded = pa.table({"age": tf.age_bands(pa.array([41, 42, 55]), "a"), "sex": pa.array(["F", "F", "M"])})
    assert tf.k_anonymity(coded, ["age", "sex"]) == (1, {"age": "50-59", "sex": "M"})


def test_pseudonym_text_is_standard_base32_of_the_keyed_digest():
    import base64
    import hashlib

    ids = ["000123", "Ä-7", "x" * 300]
    want = [
        "P-"
        + base64.b32encode(
            hashlib.blake2b(i.encode(), key=KEY_A, digest_size=18, person=b"pt-pseudonym").digest()[:10]
        ).decode()
        for i in ids
    ]
    assert plain(tf.pseudonymise(pa.array(ids), KEY_A)) == want


def _reference(value: str, pkey: bytes, domain: str = "", prefix: str = "P-", window: int = 180) -> tuple[str, int]:
    """The published encoding, written out with hashlib and base64 only (independent of transforms.py)."""
    import base64
    import hashlib

    if domain:
        pkey = hashlib.blake2b(domain.encode(), key=pkey, digest_size=32, person=b"pt-domain").digest()
    d = hashlib.blake2b(value.strip().encode(), key=pkey, digest_size=18, person=b"pt-pseudonym").digest()
    u = int.from_bytes(d[10:18], "little") % (2 * window) - window
    return prefix + base64.b32encode(d[:10]).decode(), u + 1 if u >= 0 else u


def test_published_pseudonyms_and_shifts_never_change_across_versions():
    # Known answers under a fixed master key: a change here would unlink every published dataset from
    # its earlier versions. Both the pinned strings and an independent re-derivation must agree.
    pkey = keys.project_key(bytes(range(32)), "oncology")
    assert keys.key_id(pkey) == "64b011310e7b"
    ids = ["000123", " 000124", "123"]
    got = plain(tf.pseudonymise(pa.array(ids), pkey))
    assert got == ["P-AP7Z426W6IPRWE66", "P-3XKGQOFKU74WRWZB", "P-S6SXRYN7TK44T3EU"]
    assert tf.shift_days([i.strip() for i in ids], pkey, 180).tolist() == [-1, -55, 42]
    assert plain(tf.pseudonymise(pa.array(["000123"]), pkey, domain="case", prefix="C-")) == ["C-3XCWT6IGHCKMGPOQ"]
    many = [f"{i:07d}" for i in range(0, 3_000_000, 997)]
    ref = [_reference(v, pkey) for v in many]
    assert plain(tf.pseudonymise(pa.array(many), pkey)) == [p for p, _ in ref]
    assert tf.shift_days(many, pkey, 180).tolist() == [s for _, s in ref]
    assert plain(tf.pseudonymise(pa.array(many[:50]), pkey, domain="case", prefix="C-")) == [
        _reference(v, pkey, "case", "C-")[0] for v in many[:50]
    ]


def test_a_pseudonym_collision_is_refused_not_published():
    values = pa.array(["a", "b", "c"])
    codes = np.array([0, 1, 2, 0])
    d = np.zeros((3, tf.DIGEST_BYTES), dtype=np.uint8)
    d[:, 0] = [1, 2, 3]
    d[2, 0], d[2, 9] = 1, 7  # same first 8 bytes as "a", differs in the 80 bits: distinct pseudonyms
    out = plain(tf.pseudonyms_by_code(codes, values, KEY_A, column="mrn", precomputed=d))
    assert len(set(out)) == 3 and out[0] == out[3]
    d[2, 9] = 0  # now all 80 bits equal "a"'s
    with pytest.raises(ColumnError) as e:
        tf.pseudonyms_by_code(codes, values, KEY_A, column="mrn", precomputed=d)
    assert e.value.column == "mrn" and "two identifiers got the same pseudonym" in str(e.value)


def test_a_dictionary_holding_an_identifier_twice_still_gives_one_code_and_pseudonym():
    # Parquet text columns arrive as dictionaries whose values are taken as distinct and then proven so by
    # their digests; a dictionary that holds a value twice must be merged, not counted as two patients.
    dup = pa.DictionaryArray.from_arrays(
        pa.array([0, 1, 2, 0, None], pa.int32()), pa.array(["000101", "000102", "000101"])
    )
    codes, values, d = tf.hashed_identifiers(dup, KEY_A)
    assert sorted(values.to_pylist()) == ["000101", "000102"] and codes[0] == codes[2] == codes[3] != codes[1]
    assert codes[4] == -1 and len(d) == 2
    assert plain(tf.pseudonymise(dup, KEY_A)) == plain(
        tf.pseudonymise(pa.array(["000101", "000102", "000101", "000101", None]), KEY_A)
    )
    clean = pa.DictionaryArray.from_arrays(pa.array([1, 0, 1], pa.int32()), pa.array(["000102", "000101"]))
    codes, values, _ = tf.hashed_identifiers(clean, KEY_A)
    assert values.to_pylist() == ["000102", "000101"] and codes.tolist() == [1, 0, 1]  # taken as it is
    holes = pa.DictionaryArray.from_arrays(pa.array([0, 1, 2, 0, 3], pa.int32()), pa.array(["a", None, " b", ""]))
    codes, values, _ = tf.hashed_identifiers(holes, KEY_A)  # missing and empty values inside the dictionary
    assert codes.tolist() == [0, -1, 1, 0, -1] and values.to_pylist() == ["a", "b"]


def test_used_values_only_drops_dictionary_values_no_row_holds():
    # a Parquet text column as read: one dictionary per row group, each listing values of other people
    unused = ["Erika Mustermann", "Hauptstraße 5, Berlin"]
    chunks = [
        pa.DictionaryArray.from_arrays(pa.array([1, None, 1], pa.int32()), pa.array([unused[0], "A", unused[1]])),
        pa.DictionaryArray.from_arrays(pa.array([0, 2], pa.int32()), pa.array(["B", unused[1], "A"])),
    ]
    out = tf.used_values_only(pa.chunked_array(chunks))
    assert sorted(out.dictionary.to_pylist()) == ["A", "B"]
    assert plain(out) == ["A", None, "A", "B", "A"]
    table = tf.used_values_only_table(pa.table({"c": pa.chunked_array(chunks), "n": [1, 2, 3, 4, 5]}))
    assert table.column("c").chunk(0).dictionary.to_pylist() == out.dictionary.to_pylist()
    assert table.column("n").to_pylist() == [1, 2, 3, 4, 5]


def test_dates_written_as_integers_parse_with_a_format():
    out = tf.parse_dates(pa.array([20210129, None, 19991231]), "admitted", "%Y%m%d")
    assert out.to_pylist() == [dt.date(2021, 1, 29), None, dt.date(1999, 12, 31)]
    with pytest.raises(ColumnError, match="row 2: not a date in format '%Y%m%d'"):
        tf.parse_dates(pa.array([20210129, 99]), "admitted", "%Y%m%d")
