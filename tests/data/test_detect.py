"""Strict mode's eye for direct identifiers: by column name and by a sample of the values."""

import pyarrow as pa
import pytest

from paitient.services.data import detect


@pytest.mark.parametrize(
    "name, what",
    [
        ("name", "name"),
        ("patient_name", "name"),
        ("family", "name"),
        ("given", "name"),
        ("LastName", "name"),
        ("Vorname", "name"),
        ("email", "email"),
        ("e_mail_address", "email"),
        ("phone", "phone"),
        ("Telefon", "phone"),
        ("mobile_no", "phone"),
        ("address", "street address"),
        ("street", "street address"),
        ("address_line_1", "street address"),
        ("NHS_number", "insurance"),
        ("kvnr", "insurance"),
        ("ssn", "insurance"),
        ("MRN", "record number"),
        ("patient_id", "record number"),
        ("id", "record number"),
        ("Fallnummer", "record number"),
        ("date_of_birth", "birth date"),
        ("DOB", "birth date"),
        ("birthDate", "birth date"),
    ],
)
def test_identifier_names(name, what):
    assert what in detect.by_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "drug_name",
        "age",
        "sex",
        "diagnosis",
        "mean radius",
        "postcode",
        "tumour_size",
        "progression",
        "time",
        "cens",
        "ward",
        "icd10",
        "lab_value",
    ],
)
def test_ordinary_names(name):
    assert detect.by_name(name) is None


@pytest.mark.parametrize(
    "values, what",
    [
        (["anna@mail.example", "bob.b@klinik.de", "x_y@h.org"], "email"),
        (["+49 30 1234567", "030 98765432", "+44 20 7946 0958"], "phone"),
        (["A123456789", "B987654321", "Z000000001"], "insurance"),  # German health insurance numbers
        (["AB 12 34 56 C", "CE123456D", "JG 10 20 30 A"], "insurance"),  # UK National Insurance
        (["943 476 5919", "401 023 2137", "123-456-7890"], "insurance"),  # NHS numbers
        (["MRN-0012345", "MRN-0012346", "MRN-0099999"], "record numbers"),
        (["00412345", "00412346", "00412347", "00412348"], "record numbers"),
        (["Hauptstraße 12", "Am Waldweg 3a", "Lindenallee 100"], "street"),
        (["12 Baker Street", "221B Baker St", "10 Downing Street"], "street"),
        (["Anna Müller", "Peter Schmidt", "Maria Weber", "Klaus Becker"], "person names"),
        (["Müller, Anna", "Schmidt, Peter", "Weber, Maria"], "person names"),
        (
            [
                "Patient reports chest pain since Monday, seen by Dr Weber at home",
                "Fell in the garden, daughter Anna called the ambulance at night",
            ],
            "free text",
        ),
    ],
)
def test_identifier_values(values, what):
    found = detect.by_content(pa.array(values * 3))
    assert found is not None and what in found[0] and found[1] == 1


@pytest.mark.parametrize(
    "values",
    [
        ["2020-01-02", "2021-03-04", "2019-12-31"],
        ["2020-01-02T10:00:00+01:00", "2020-01-02 11:30"],
    ],
)
def test_undeclared_dates_are_caught(values):
    assert "real dates" in detect.by_content(pa.array(values * 3))[0]
    assert "real dates" in detect.by_content(pa.array([None, "2020-01-01"]).cast(pa.date32()))[0]


def test_integer_record_numbers_are_caught():
    assert detect.by_content(pa.array(list(range(4_100_000, 4_100_050))))[0] == "record numbers"


def test_first_matching_row_is_named():
    values = [None, "", "anna@mail.example", "bob@mail.example", "eve@mail.example"]
    assert detect.by_content(pa.array(values)) == ("email addresses", 3)


@pytest.mark.parametrize(
    "values",
    [
        ["Post", "Pre", "Post", "Post", "Pre"],  # repeated categories that look like words
        ["Invasive Ductal", "Invasive Ductal", "Lobular Carcinoma", "Invasive Ductal"],
        ["C50.9", "E11.9", "I10", "C50.1"],  # ICD-10 codes
        ["I", "II", "III", "II"],
        ["yes", "no", "no"],
    ],
)
def test_ordinary_values(values):
    assert detect.by_content(pa.array(values * 3)) is None


def test_numbers_are_not_identifiers():
    assert detect.by_content(pa.array([1.5, 2.25, 3.0] * 10)) is None
    assert detect.by_content(pa.array([34, 56, 71, 34, 12])) is None  # small integers, e.g. ages


def test_the_sample_spans_the_whole_column_not_its_first_rows():
    # 20,000 harmless rows on top, then e-mail addresses: a first-rows sample would pass this column
    n = 100_000
    values = ["no"] * 20_000 + [f"p{i}@mail.example" for i in range(n - 20_000)]
    what, row = detect.by_content(pa.chunked_array([values[:50_000], values[50_000:]]))
    assert what == "email addresses" and row > 20_000 and values[row - 1].endswith("@mail.example")
    # the same behind a column that is empty at the top, and as a dictionary (Parquet text columns)
    sparse = pa.array([None] * 50_000 + [f"p{i}@mail.example" for i in range(3000)])
    assert detect.by_content(sparse) == ("email addresses", 50_001)
    assert detect.by_content(sparse.dictionary_encode())[0] == "email addresses"
    ints = pa.array([None] * 30_000 + list(range(4_100_000, 4_103_000)), pa.int64())
    assert detect.by_content(ints) == ("record numbers", 30_001)
    dates = pa.array([None] * 30_000 + [0], pa.int32()).cast(pa.date32())
    assert detect.by_content(dates) == ("real dates (unshifted, they link records to real events)", 30_001)


def test_integer_record_numbers_repeating_over_a_patients_rows_are_caught():
    # a long table: 100 patients with 5 rows each; a first-rows-distinct rule would pass this column
    repeated = [4_100_000 + i // 5 for i in range(500)]
    assert detect.by_content(pa.array(repeated)) == ("record numbers", 1)
    assert detect.by_content(pa.array(repeated, pa.int32()).dictionary_encode())[0] == "record numbers"
    # large numbers that take few values (a code list) are no identifier
    assert detect.by_content(pa.array([100_001, 100_002, 100_003] * 100)) is None


DAYS = ["2021-01-29", "2020-12-03", "2019-07-31", "2021-02-28", "2020-02-29", "2018-11-05"]


@pytest.mark.parametrize(
    "form, fmt",
    [
        ("%d.%m.%Y", "%d.%m.%Y"),
        ("%d/%m/%Y", "%d/%m/%Y"),
        ("%m/%d/%Y", "%m/%d/%Y"),
        ("%d-%m-%Y", "%d-%m-%Y"),
        ("%Y/%m/%d", "%Y/%m/%d"),
        ("%Y%m%d", "%Y%m%d"),
        ("%d %b %Y", "%d %b %Y"),
        ("%d-%b-%Y", "%d-%b-%Y"),
        ("%b %d, %Y", "%b %d, %Y"),
        ("%d.%m.%Y %H:%M", "%d.%m.%Y"),
        ("%d %B %Y", "?"),  # a month's full name: a date, but no format to suggest
    ],
)
def test_undeclared_dates_in_other_forms_are_caught_with_their_format(form, fmt):
    import datetime as dt

    values = [dt.datetime.fromisoformat(d).strftime(form) for d in DAYS]
    found = detect.by_content(pa.array([None, *values]))
    assert found == (detect.DATES, 2)
    assert detect.date_format(pa.array(values)) == fmt


def test_dates_as_integers_are_caught_and_impossible_days_are_not_dates():
    ints = [int(d.replace("-", "")) for d in DAYS]
    assert detect.by_content(pa.array(ints * 3)) == (detect.DATES, 1)
    assert detect.date_format(pa.array(ints)) == "%Y%m%d"
    # German dates, day first: 29.01.2021 starts no phone number, 01.02.2021 neither
    assert detect.by_content(pa.array(["01.02.2021", "03.04.2020", "05.06.2019"] * 3))[0] == detect.DATES
    # no such days (or years out of 1850-2100): not dates
    for values in (["31.02.2021", "32.01.2021", "00.13.2020"], ["1.2.3456", "12.11.1234"], ["Jan 32, 2021"]):
        assert detect.date_format(pa.array(values * 3)) is None
        found = detect.by_content(pa.array(values * 3))
        assert found is None or found[0] != detect.DATES
    assert detect.by_content(pa.array([20211345, 20210230, 41000012] * 3)) == ("record numbers", 1)  # not dates
    assert detect.by_content(pa.array([None] * 10, pa.int64())) is None
    assert detect.date_format(pa.array([None] * 10, pa.int64())) is None


def test_identifiers_in_the_types_and_names_strict_mode_did_not_read_are_caught():
    """Attack (a review's): a raw MRN column as floats (pandas writes an integer column with one missing value
    so), names stored as bytes (Spark and Hive write text so), a list of aliases, FHIR's UUIDs and references,
    and identifier columns named hospital_no, identifier, encounter, subject. Each was published as
    "keep (undeclared)": only integers and text were examined, and the names were not known."""
    import uuid

    mrns = pa.array([7_000_000.0 + i for i in range(40)] + [None])
    assert detect.by_content(mrns) == ("record numbers", 1)
    assert detect.date_format(pa.array([20210129.0, 20200202.0, 19991231.0])) == "%Y%m%d"
    given, family = ("Anna", "Peter", "Maria", "Klaus"), ("Müller", "Weber", "Becker", "Schmidt", "Wagner")
    names = pa.array([f"{g} {f}".encode() for g in given for f in family])
    assert detect.by_content(names) == ("person names", 1)
    what, row = detect.by_content(pa.array([["Anna M."], ["Peter S."]]))
    assert what.startswith("nested values (list<") and "strict mode cannot examine" in what and row == 1
    assert (
        detect.by_content(pa.array([b"\xffraw"]))[0]
        == "bytes that are not UTF-8 text, which strict mode cannot examine"
    )
    ids = [str(uuid.UUID(int=i * 7919 + 1)) for i in range(30)]
    assert detect.by_content(pa.array(ids)) == ("record identifiers (UUIDs)", 1)
    assert detect.by_content(pa.array([f"Patient/{i}" for i in ids])) == ("record identifiers (UUIDs)", 1)
    for name in ("hospital_no", "hosp_nr", "identifier", "encounter", "subject", "mrn_number", "MedicalRecordNumber"):
        assert detect.by_name(name) == "a record number", name
    # measurements with fractions, and booleans, are not identifiers
    assert detect.by_content(pa.array([1.5, 2.25, 3.0, None])) is None
    assert detect.by_content(pa.array([True, False, None])) is None
