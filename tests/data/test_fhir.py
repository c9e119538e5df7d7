"""FHIR R4 NDJSON: flattened per resource type, then ingested like any table."""

import json

import pyarrow.parquet as pq
import pytest

from paitient.services.data import fhir
from paitient.services.data import ingest as ing
from paitient.services.data.errors import IngestRefused

from .conftest import in_source_order, make_spec

PATIENT = {
    "resourceType": "Patient",
    "id": "pat-1",
    "identifier": [{"system": "urn:mrn", "value": "000101"}],
    "name": [{"family": "Müller", "given": ["Anna", "Luise"]}],
    "gender": "female",
    "birthDate": "1970-05-04",
    "telecom": [{"system": "phone", "value": "+49 30 1234567"}, {"system": "email", "value": "a@m.example"}],
    "address": [{"line": ["Hauptstraße 12"], "city": "Berlin", "postalCode": "10115", "country": "DE"}],
}
ENCOUNTER = {
    "resourceType": "Encounter",
    "id": "enc-1",
    "status": "finished",
    "class": {"code": "IMP"},
    "subject": {"reference": "Patient/pat-1"},
    "period": {"start": "2020-01-10T08:00:00+01:00", "end": "2020-01-14T12:00:00+01:00"},
    "reasonCode": [{"coding": [{"code": "C50.9", "display": "Breast cancer"}]}],
}
CONDITION = {
    "resourceType": "Condition",
    "id": "c-1",
    "subject": {"reference": "Patient/pat-1"},
    "encounter": {"reference": "Encounter/enc-1"},
    "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "C50.9"}]},
    "clinicalStatus": {"coding": [{"code": "active"}]},
    "onsetDateTime": "2019-12-20",
}
OBSERVATIONS = [
    {
        "resourceType": "Observation",
        "id": f"o-{i}",
        "status": "final",
        "subject": {"reference": f"Patient/pat-{p}"},
        "encounter": {"reference": "Encounter/enc-1"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0", "display": "Glucose"}]},
        "effectiveDateTime": f"2020-01-1{i}T09:00:00+01:00",
        "valueQuantity": {"value": 5.5 + i, "unit": "mmol/L"},
    }
    for i, p in ((1, 1), (2, 1), (3, 2), (4, 2))
]


def ndjson(path, resources):
    path.write_text("".join(json.dumps(r) + "\n" for r in resources))
    return path


def test_each_resource_type_flattens_to_its_columns(tmp_path):
    src = ndjson(tmp_path / "all.ndjson", [PATIENT, ENCOUNTER, CONDITION, *OBSERVATIONS])
    p = fhir.read_ndjson(src, "Patient").to_pylist()[0]
    assert p["family"] == "Müller" and p["given"] == "Anna Luise" and p["phone"] == "+49 30 1234567"
    assert p["postal_code"] == "10115" and p["address_line"] == "Hauptstraße 12" and p["identifier"] == "000101"
    e = fhir.read_ndjson(src, "Encounter").to_pylist()[0]
    assert e["patient"] == "pat-1" and e["class_code"] == "IMP" and e["reason_code"] == "C50.9"
    c = fhir.read_ndjson(src, "Condition").to_pylist()[0]
    assert c["encounter"] == "enc-1" and c["code"] == "C50.9" and c["clinical_status"] == "active"
    o = fhir.read_ndjson(src, "Observation")
    assert o.column_names == list(fhir.COLUMNS["Observation"]) and o.num_rows == 4
    assert o.to_pylist()[0]["value_number"] == 6.5 and o.to_pylist()[0]["value_unit"] == "mmol/L"


def test_refusals_name_the_line(tmp_path):
    bad = tmp_path / "bad.ndjson"
    bad.write_text(json.dumps(PATIENT) + "\n{not json\n")
    with pytest.raises(IngestRefused, match="bad.ndjson line 2: not a JSON resource"):
        fhir.read_ndjson(bad, "Patient")
    bad.write_text(json.dumps(PATIENT) + "\n" + json.dumps({"id": "x"}) + "\n")
    with pytest.raises(IngestRefused, match="bad.ndjson line 2: no resourceType"):
        fhir.read_ndjson(bad)
    mixed = ndjson(tmp_path / "mixed.ndjson", [PATIENT, ENCOUNTER])
    with pytest.raises(IngestRefused, match='holds Encounter, Patient; say resource = "..."'):
        fhir.read_ndjson(mixed)
    with pytest.raises(IngestRefused, match="resource = 'Medication' is not supported"):
        fhir.read_ndjson(mixed, "Medication")
    with pytest.raises(IngestRefused, match="holds no Observation resources"):
        fhir.read_ndjson(mixed, "Observation")


def _zoned_site(site, zone: str = "Europe/Berlin"):
    """The test's site with ``[workspace] time_zone`` set (the same state dir and key)."""
    from paitient.config import load

    return load(
        None,
        overrides={
            "workspace": {"state_dir": str(site.state_dir), "min_k": 2, "time_zone": zone},
            "accounts": {"prefix": site.accounts.prefix},
        },
    )


def test_observations_ingest_with_patient_pseudonyms_and_shifted_zoned_times(site, tmp_path):
    site = _zoned_site(site)
    src = ndjson(tmp_path / "obs.ndjson", OBSERVATIONS)
    cols = {
        "id": "drop",
        "patient": "pseudonym",
        "encounter": {"action": "pseudonym", "domain": "enc"},
        "effective_date": "date_shift",
        "value_text": "drop",
    }
    spec = make_spec(src, cols, patient_id="patient", format="fhir", resource="Observation")
    pub = ing.ingest(site, spec, operator="t")
    rows = pq.read_table(pub.path / "data.parquet").to_pylist()
    assert pub.manifest["source_format"] == "fhir:Observation" and len(rows) == 4
    rows = in_source_order(rows, "value_number", [6.5, 7.5, 8.5, 9.5])  # published in a keyed order
    assert rows[0]["patient"] == rows[1]["patient"] != rows[2]["patient"]
    assert (rows[1]["effective_date"] - rows[0]["effective_date"]).days == 1
    # the wall clock in the site's zone, without an offset (09:00+01:00 was 09:00 in Berlin)
    assert rows[0]["effective_date"].tzinfo is None and rows[0]["effective_date"].hour == 9
    assert rows[0]["value_number"] == 6.5
    assert pub.manifest["time_zone"] == "Europe/Berlin"


def _visits(times: list[str]) -> list[dict]:
    return [
        {
            "resourceType": "Observation",
            "id": f"v-{i}",
            "status": "final",
            "subject": {"reference": "Patient/pat-1" if i % 2 else "Patient/pat-2"},
            "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
            "effectiveDateTime": t,
            "valueQuantity": {"value": float(i), "unit": "mmol/L"},
        }
        for i, t in enumerate(times)
    ]


# Visits at 08:00 Berlin time on both sides of the changes of the clocks (28 March and 31 October 2021): with
# their offsets, and the same moments in UTC
BERLIN_8AM = ["2021-03-20T08:00:00+01:00", "2021-03-21T08:00:00+01:00", "2021-04-03T08:00:00+02:00",
              "2021-04-04T08:00:00+02:00", "2021-10-30T08:00:00+02:00", "2021-11-06T08:00:00+01:00"]  # fmt: skip
BERLIN_8AM_UTC = ["2021-03-20T07:00:00Z", "2021-03-21T07:00:00Z", "2021-04-03T06:00:00Z",
                  "2021-04-04T06:00:00Z", "2021-10-30T06:00:00Z", "2021-11-06T07:00:00Z"]  # fmt: skip


@pytest.mark.parametrize("times", [BERLIN_8AM, BERLIN_8AM_UTC], ids=["offsets", "utc"])
def test_shifted_zoned_times_keep_no_trace_of_summer_time(site, tmp_path, times):
    """Attack: each patient's visits at 08:00 local time, in winter and summer time. Kept in UTC and shifted by
    whole days, a winter visit published at 07:00Z and a summer one at 06:00Z said which real dates fell in
    summer time; trying each offset of the window against that left 4 of 360 for a patient. Published as the
    wall clock in the site's zone, every visit is at 08:00 with no offset: nothing tells the seasons apart."""
    site = _zoned_site(site)
    src = ndjson(tmp_path / "visits.ndjson", _visits(times))
    cols = {"id": "drop", "patient": "pseudonym", "encounter": "drop", "effective_date": "date_shift"}
    spec = make_spec(src, cols, patient_id="patient", format="fhir", resource="Observation")
    table = pq.read_table(ing.ingest(site, spec, operator="t").path / "data.parquet")
    assert table.schema.field("effective_date").type.tz is None
    rows = table.to_pylist()
    assert {(r["effective_date"].hour, r["effective_date"].minute) for r in rows} == {(8, 0)}
    # the intervals within a patient are the wall clock's: a week from Saturday to Saturday, in either season
    by_value = {r["value_number"]: r["effective_date"] for r in rows}
    assert (by_value[2.0] - by_value[0.0]).days == 14 and (by_value[3.0] - by_value[1.0]).days == 14


def test_zoned_times_to_shift_are_refused_until_the_site_names_its_time_zone(site, tmp_path):
    src = ndjson(tmp_path / "visits.ndjson", _visits(BERLIN_8AM))
    cols = {"id": "drop", "patient": "pseudonym", "encounter": "drop", "effective_date": "date_shift"}
    spec = make_spec(src, cols, patient_id="patient", format="fhir", resource="Observation")
    with pytest.raises(
        IngestRefused, match=r"'effective_date': holds times with a UTC offset.*Set \[workspace\] time_zone"
    ):
        ing.ingest(site, spec, operator="t")


def test_patient_table_with_undeclared_identifiers_is_refused(site, tmp_path):
    src = ndjson(tmp_path / "pat.ndjson", [PATIENT])
    spec = make_spec(src, {"id": "pseudonym"}, format="fhir")
    with pytest.raises(IngestRefused) as e:
        ing.ingest(site, spec, operator="t")
    for col in ("identifier", "family", "given", "birth_date", "phone", "email", "address_line"):
        assert f"column {col!r} is not in the spec" in str(e.value)


def test_a_value_of_the_wrong_kind_is_refused_by_its_line_without_quoting_it(tmp_path):
    """A name where FHIR has a boolean, an object where it has an id: Arrow's own error escaped ingest (no
    refusal, no audit record) and one quoted the value ("Could not convert 'Anna Mueller'")."""
    good = {"resourceType": "Patient", "id": "a", "birthDate": "1970-01-01"}
    for bad, column, words in (
        ({"resourceType": "Patient", "id": "b", "deceasedBoolean": "Anna Mueller"}, "deceased", "true or false"),
        ({"resourceType": "Patient", "id": {"value": "b"}}, "id", "text"),
    ):
        src = ndjson(tmp_path / "p.ndjson", [good, bad])
        with pytest.raises(IngestRefused) as e:
            fhir.read_ndjson(src, "Patient")
        assert f"p.ndjson line 2: the value behind column {column!r} is not {words} as FHIR writes it" in str(e.value)
        assert "Anna" not in str(e.value)
