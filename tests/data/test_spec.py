"""Spec parsing: every mistake named, before any data is read."""

import tomllib
from pathlib import Path

import pytest

from paitient.services.data.errors import IngestRefused
from paitient.services.data.spec import check_against, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[2]
BASE = {"project": "oncology", "dataset": "breast_cancer", "source": "x.csv"}


def refused(raw) -> str:
    with pytest.raises(IngestRefused) as e:
        parse_spec(raw, Path("/src"))
    assert str(e.value).startswith("ingest refused, nothing published")
    return str(e.value)


def test_a_full_spec_parses_with_defaults():
    spec = parse_spec(
        {
            **BASE,
            "patient_id": "mrn",
            "quasi_identifiers": ["age"],
            "columns": {
                "mrn": {"action": "pseudonym", "rename": "patient"},
                "name": "drop",
                "seen": "date_shift",
                "age": {"action": "generalize", "method": "age_band"},
            },
        },
        Path("/src"),
    )
    assert spec.source == Path("/src/x.csv") and spec.format == "csv" and spec.strict
    assert spec.rules["mrn"].output == "patient" and spec.rules["mrn"].params["prefix"] == "P-"
    assert spec.rules["age"].action == "generalise" and spec.rules["age"].params["width"] == 10
    assert spec.rules["name"].params == {}


@pytest.mark.parametrize(
    "raw, message",
    [
        ({**BASE, "columns": {"a": "shred"}}, "[columns] 'a': unknown action 'shred'; actions: drop, pseudonym"),
        ({**BASE, "columns": {"a": {"action": "keep", "colour": 1}}}, "unknown key 'colour' for keep"),
        ({**BASE, "columns": {"a": {"action": "generalise"}}}, "generalise needs method = one of age_band"),
        (
            {**BASE, "columns": {"a": {"action": "generalise", "method": "age_band", "width": "10"}}},
            "width must be int",
        ),
        (
            {**BASE, "columns": {"a": {"action": "generalise", "method": "age_band", "edges": [10, 5]}}},
            "edges must be at least two increasing numbers",
        ),
        ({**BASE, "columns": {"a": {"action": "generalise", "method": "rare", "min_count": 1}}}, "min_count must be"),
        ({**BASE, "columns": {"a": {"action": "keep", "type": "blob"}}}, "type must be one of"),
        ({**BASE, "columns": {"d": "date_shift"}}, "'d' is date_shift, which needs patient_id"),
        ({**BASE, "patient_id": "mrn", "columns": {"mrn": "keep"}}, "patient_id = 'mrn' is a direct identifier"),
        ({**BASE, "patient_id": "mrn", "columns": {}}, "patient_id = 'mrn' is not in [columns]"),
        ({**BASE, "quasi_identifiers": ["age"], "columns": {}}, "quasi_identifiers: 'age' is not in [columns]"),
        ({**BASE, "quasi_identifiers": ["n"], "columns": {"n": "drop"}}, "'n' is declared drop"),
        ({**BASE, "columns": {"a": {"action": "keep", "rename": "b"}, "b": "keep"}}, "both come out as 'b'"),
        ({**BASE, "colums": {}}, "unknown key(s) colums"),
        ({"dataset": "x", "source": "x.csv", "columns": {}}, "missing key 'project'"),
        ({**BASE, "project": "Onco Logy", "columns": {}}, "project = 'Onco Logy'"),
        ({**BASE, "source": "x.xlsx", "columns": {}}, "say format = one of csv, parquet, fhir"),
        ({**BASE, "min_k": "5", "columns": {}}, "min_k must be a whole number"),
    ],
)
def test_mistakes_are_named(raw, message):
    assert message in refused(raw)


def test_all_problems_are_listed_at_once():
    text = refused({**BASE, "columns": {"a": "shred", "b": "burn"}})
    assert "2 problems" in text and "'a'" in text and "'b'" in text


def test_columns_missing_from_the_source_are_named_with_the_real_ones():
    spec = parse_spec({**BASE, "columns": {"mrn": "drop", "nmae": "drop"}}, Path("/src"))
    with pytest.raises(IngestRefused, match=r"'nmae' is not a column of the source; its columns are: mrn, name"):
        check_against(spec, ["mrn", "name"])


def test_spec_files_name_themselves_in_errors(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text('project = "oncology"\ndataset = [\n')
    with pytest.raises(IngestRefused, match="s.toml is not valid TOML"):
        load_spec(p)
    with pytest.raises(IngestRefused, match="does not exist"):
        load_spec(tmp_path / "none.toml")


def test_shipped_specs_parse():
    specs = sorted((REPO / "extensions/paitient/ops/demo_specs").glob("*.toml"))
    specs += sorted((REPO / "hub_config/ingest").glob("*.toml"))
    assert len(specs) >= 5
    for p in specs:
        spec = load_spec(p)
        raw = tomllib.loads(p.read_text())
        assert spec.project == raw["project"] and set(spec.rules) == set(raw["columns"])


def test_digest_ignores_where_the_source_lies_but_not_the_rules():
    a = parse_spec({**BASE, "columns": {"a": "keep"}}, Path("/one"))
    b = parse_spec({**BASE, "source": "/two/y.csv", "columns": {"a": "keep"}}, Path("/one"))
    c = parse_spec({**BASE, "columns": {"a": "drop"}}, Path("/one"))
    d = a.digest(min_k=5, date_shift_days=180)
    assert d == b.digest(min_k=5, date_shift_days=180) != c.digest(min_k=5, date_shift_days=180)
    assert d != a.digest(min_k=5, date_shift_days=90)
