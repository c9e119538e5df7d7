"""Fixtures for the data tests: a site on a private temp state dir with its key, and source/spec writers."""

from __future__ import annotations

import csv
import secrets
from pathlib import Path

import pytest

from paitient.config import load
from paitient.services.data import keys
from paitient.services.data.spec import Spec, parse_spec


@pytest.fixture
def site(tmp_path):
    """The embedded demo site (projects oncology and cardiometabolic) on a temp state dir, min_k 2."""
    # An accounts prefix of its own: publication creates the projects' groups from it (removed after each test).
    s = load(
        None,
        overrides={
            "workspace": {"state_dir": str(tmp_path / "state"), "min_k": 2},
            "accounts": {"prefix": "t" + secrets.token_hex(2)},
        },
    )
    keys.ensure_key(s)
    return s


def write_csv(path: Path, header: list[str], rows: list[list], encoding: str = "utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def make_spec(source: Path, columns: dict, **top) -> Spec:
    raw = {"project": "oncology", "dataset": "breast_cancer", "columns": columns, **top}
    return parse_spec(raw, source.parent, source=source)


PATIENTS = [
    # mrn, name, email, diagnosed, age, postcode, score
    ["000101", "Anna Müller", "anna.mueller@mail.example", "2020-01-10", 34, "10115", 1.5],
    ["000102", "Peter Schmidt", "p.schmidt@mail.example", "2020-02-11", 37, "10117", 2.5],
    ["000101", "Anna Müller", "anna.mueller@mail.example", "2020-03-15", 34, "10115", 3.5],
    ["000103", "Maria Weber", "maria.weber@mail.example", "2021-04-01", 61, "12043", 4.5],
    ["000104", "Klaus Becker", "k.becker@mail.example", "2021-05-20", 66, "12045", 5.5],
    ["000103", "Maria Weber", "maria.weber@mail.example", "2021-06-30", 61, "12043", 6.5],
]
HEADER = ["mrn", "name", "email", "diagnosed", "age", "postcode", "score"]

COLUMNS = {
    "mrn": {"action": "pseudonym", "rename": "patient"},
    "name": "drop",
    "email": "drop",
    "diagnosed": "date_shift",
    "age": {"action": "generalise", "method": "age_band", "width": 50},
    "postcode": {"action": "generalise", "method": "prefix", "length": 1},
    "score": "keep",
}


@pytest.fixture
def patients_csv(tmp_path) -> Path:
    return write_csv(tmp_path / "patients.csv", HEADER, PATIENTS)


@pytest.fixture
def patients_spec(patients_csv) -> Spec:
    return make_spec(patients_csv, COLUMNS, patient_id="mrn", quasi_identifiers=["age", "postcode"])


def in_source_order(rows: list[dict], column: str, source_values: list) -> list[dict]:
    """Published rows (which come in a keyed order of their own, never the source's) matched back to the
    source's rows by a published column whose values are unique per row, as test sources have."""
    by = {r[column]: r for r in rows}
    assert len(by) == len(rows), f"{column!r} does not tell the rows apart"
    return [by[v] for v in source_values]


def pseudonyms(site, project: str, identifiers: list[str]) -> list[str]:
    """The pseudonyms ``identifiers`` get in ``project`` (a test may derive them: it holds the key)."""
    from paitient.rules import pseudonyms as tf

    pkey = keys.project_key(keys.load_master_key(site), project)
    return tf.pseudonym_strings([str(i) for i in identifiers], pkey).to_pylist()
