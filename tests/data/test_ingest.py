"""The whole ingest: what gets published, where, how; and each refusal, after which nothing is published."""

import datetime as dt
import grp
import json
import os
import stat
from dataclasses import replace

import pyarrow.parquet as pq
import pytest

from paitient.config.errors import SettingError
from paitient.services.data import access, keys
from paitient.services.data import ingest as ing
from paitient.services.data.errors import IngestRefused
from paitient.services.data.publish import current_version, dataset_dir, versions

from .conftest import COLUMNS, HEADER, PATIENTS, in_source_order, make_spec, pseudonyms, write_csv


def published_rows(path):
    return pq.read_table(path / "data.parquet").to_pylist()


def patients_rows(path):
    """The published rows of PATIENTS, matched back to the source rows by their (unique) score."""
    return in_source_order(published_rows(path), "score", [r[6] for r in PATIENTS])


def audit_records(site):
    out = []
    for f in sorted((site.state_dir / "audit").glob("*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return [r for r in out if r["action"] == "ingest.publish"]


def assert_nothing_published(site, project="oncology", dataset="breast_cancer"):
    ds = dataset_dir(site.data_root, project, dataset)
    assert not (ds / "current").exists()
    assert versions(ds) == []


def test_publishes_a_read_only_root_owned_version_with_a_manifest(site, patients_spec):
    pub = ing.ingest(site, patients_spec, operator="olga")
    ds = dataset_dir(site.data_root, "oncology", "breast_cancer")
    assert pub.version == 1 and pub.path == ds / "versions" / "1"
    assert os.readlink(ds / "current") == "versions/1"
    project_gid = grp.getgrnam(access.group_name(site, "oncology")).gr_gid
    for p, gid, mode in (
        (site.data_root, 0, 0o711),
        (site.data_root / "oncology", project_gid, 0o750),
        (ds, project_gid, 0o750),
        (pub.path, project_gid, 0o750),
        (pub.path / "data.parquet", project_gid, 0o440),
        (pub.path / "manifest.json", project_gid, 0o440),
    ):
        st = p.stat()
        assert st.st_uid == 0 and st.st_gid == gid and stat.S_IMODE(st.st_mode) == mode, p
    m = json.loads((pub.path / "manifest.json").read_text())
    assert m["project"] == "oncology" and m["dataset"] == "breast_cancer" and m["version"] == 1
    assert m["rows"] == 6 and m["patients"] == 4 and m["k"] == 2 and m["k_unit"] == "patients"
    assert m["quasi_identifiers"] == ["age", "postcode"] and m["min_k"] == 2
    assert m["operator"] == "olga" and m["source_format"] == "csv" and m["dropped"] == ["name", "email"]
    assert m["source_sha256"] == ing.readers.sha256_file(patients_spec.source)
    assert m["spec_sha256"] == patients_spec.digest(min_k=2, date_shift_days=180)
    assert dt.datetime.fromisoformat(m["created"]).tzinfo is not None
    assert [(c["name"], c["type"]) for c in m["columns"]] == [
        ("patient", "string"),
        ("diagnosed", "date32[day]"),
        ("age", "string"),
        ("postcode", "string"),
        ("score", "double"),
    ]
    rows = patients_rows(pub.path)
    assert [r["age"] for r in rows] == ["0-49", "0-49", "0-49", "50-89", "50-89", "50-89"]
    assert {r["postcode"] for r in rows} == {"1"} and [r["score"] for r in rows] == [1.5, 2.5, 3.5, 4.5, 5.5, 6.5]
    assert rows[0]["patient"] == rows[2]["patient"] != rows[1]["patient"]
    (rec,) = audit_records(site)
    assert rec["actor"] == "olga" and rec["outcome"] == "ok" and rec["object"] == "oncology/breast_cancer@v1"
    assert rec["details"]["rows"] == 6 and rec["details"]["k"] == 2


def test_dates_move_per_patient_and_intervals_survive(site, patients_spec):
    rows = patients_rows(ing.ingest(site, patients_spec, operator="t").path)
    raw = [dt.date.fromisoformat(r[3]) for r in PATIENTS]
    shift = [(r["diagnosed"] - d).days for r, d in zip(rows, raw, strict=True)]
    assert all(s != 0 and abs(s) <= 180 for s in shift)
    assert shift[0] == shift[2] and shift[3] == shift[5]  # one offset per patient
    assert (rows[2]["diagnosed"] - rows[0]["diagnosed"]).days == (raw[2] - raw[0]).days


def test_reingest_publishes_a_new_version_with_the_same_pseudonyms(site, patients_spec):
    v1 = ing.ingest(site, patients_spec, operator="t")
    v2 = ing.ingest(site, patients_spec, operator="t")
    ds = dataset_dir(site.data_root, "oncology", "breast_cancer")
    assert (v1.version, v2.version) == (1, 2) and versions(ds) == [1, 2] and current_version(ds) == 2
    assert published_rows(v1.path) == published_rows(v2.path)


def test_pseudonyms_and_shifts_are_stable_across_datasets_and_differ_across_projects(site, tmp_path):
    a = write_csv(tmp_path / "a.csv", HEADER, PATIENTS)
    # another extract of the same patients, other columns, other order
    b = write_csv(tmp_path / "b.csv", ["seen", "mrn"], [["2020-01-10", "000103"], ["2020-01-10", "000101"]])
    spec_a = make_spec(a, COLUMNS, patient_id="mrn")
    spec_b = make_spec(b, {"mrn": "pseudonym", "seen": "date_shift"}, patient_id="mrn", dataset="gbsg2")
    spec_c = make_spec(
        b, {"mrn": "pseudonym", "seen": "date_shift"}, patient_id="mrn", project="cardiometabolic", dataset="diabetes"
    )
    ra = patients_rows(ing.ingest(site, spec_a, operator="t").path)
    rb = published_rows(ing.ingest(site, spec_b, operator="t").path)
    rc = published_rows(ing.ingest(site, spec_c, operator="t").path)
    seen = {r["mrn"]: r["seen"] for r in rb}
    assert set(seen) == {ra[3]["patient"], ra[0]["patient"]}
    assert seen[ra[0]["patient"]] == ra[0]["diagnosed"]  # same patient, same raw date, same shifted date
    assert {r["mrn"] for r in rc}.isdisjoint(r["patient"] for r in ra)
    assert sorted(r["seen"] for r in rc) != sorted(r["seen"] for r in rb)


def test_shifts_in_whole_weeks_keep_each_dates_weekday_and_are_recorded(site, patients_csv):
    weekly = site.replace(workspace=site.workspace.replace(date_shift_unit="week"))
    spec = make_spec(patients_csv, COLUMNS, patient_id="mrn")
    pub = ing.ingest(weekly, spec, operator="t")
    rows = patients_rows(pub.path)  # in source order
    moved = [(r["diagnosed"] - dt.date.fromisoformat(src[3])).days for r, src in zip(rows, PATIENTS, strict=True)]
    assert all(m % 7 == 0 and m != 0 and abs(m) <= 175 for m in moved) and len(set(moved)) > 1
    assert [r["diagnosed"].weekday() for r in rows] == [dt.date.fromisoformat(src[3]).weekday() for src in PATIENTS]
    m = json.loads((pub.path / "manifest.json").read_text())
    assert m["date_shift_unit"] == "week"
    assert m["spec_sha256"] == spec.digest(min_k=2, date_shift_days=180, date_shift_unit="week")
    assert m["spec_sha256"] != spec.digest(min_k=2, date_shift_days=180)  # a re-ingest in days is not current


def test_weeks_need_a_window_of_at_least_a_week(site):
    with pytest.raises(SettingError, match='date_shift_days: must be at least 7 when date_shift_unit is "week"'):
        site.workspace.replace(date_shift_unit="week", date_shift_days=6)


def refusal(site, spec) -> str:
    with pytest.raises(IngestRefused) as e:
        ing.ingest(site, spec, operator="t")
    assert_nothing_published(site, spec.project, spec.dataset)
    (rec,) = audit_records(site)
    assert rec["outcome"] == "denied" and rec["details"]["problems"] == e.value.recorded
    return str(e.value)


def test_refuses_spec_columns_the_source_lacks(site, patients_csv):
    cols = {**COLUMNS, "gender": "keep"}
    text = refusal(site, make_spec(patients_csv, cols, patient_id="mrn"))
    assert "[columns] 'gender' is not a column of the source; its columns are: mrn, name, email" in text


def test_refuses_undeclared_identifiers_by_name_and_by_content(site, tmp_path):
    src = write_csv(
        tmp_path / "s.csv",
        ["mrn", "surname", "contact", "score"],
        [[f"{i:06d}", f"Name{i}", f"p{i}@mail.example", i] for i in range(30)],
    )
    text = refusal(site, make_spec(src, {"mrn": "pseudonym", "score": "keep"}))
    assert "column 'surname' is not in the spec and has a name that suggests a person's name" in text
    assert "column 'contact' is not in the spec and has values like email addresses (first at row 1)" in text
    assert 'surname = "drop"' in text


def test_strict_off_passes_undeclared_columns(site, tmp_path):
    src = write_csv(tmp_path / "s.csv", ["mrn", "contact"], [[f"{i:06d}", f"p{i}@mail.example"] for i in range(3)])
    pub = ing.ingest(site, make_spec(src, {"mrn": "pseudonym"}, strict=False), operator="t")
    assert sorted(r["contact"] for r in published_rows(pub.path)) == [f"p{i}@mail.example" for i in range(3)]
    assert pub.manifest["columns"][1]["action"] == "keep (undeclared)"


def test_refuses_k_below_the_minimum_naming_the_group_to_the_operator_alone(site, patients_csv):
    """The operator reads the smallest group's values, to see what to generalise. The audit trail, which
    stewards read in the browser and no record can take back, named them too: values of fewer than min_k
    patients, of a dataset never published. It names the columns now."""
    cols = {**COLUMNS, "age": {"action": "generalise", "method": "age_band", "width": 5}}
    text = refusal(site, make_spec(patients_csv, cols, patient_id="mrn", quasi_identifiers=["age", "postcode"]))
    assert "k-anonymity 1 is below the minimum 2" in text and "has only 1 patients" in text
    assert "generalise the quasi-identifiers more" in text
    group = text.split("the group (", 1)[1].split(")", 1)[0]
    assert "age = " in group and "postcode = '1" in group  # the operator's message names the values
    (rec,) = audit_records(site)
    (recorded,) = rec["details"]["problems"]
    assert "the smallest group over age, postcode has only 1 patients" in recorded
    assert group not in recorded and "'1" not in json.dumps(rec)  # no postcode of the source on the trail


def test_spec_may_raise_min_k_but_not_lower_it(site, patients_csv):
    text = refusal(site, make_spec(patients_csv, COLUMNS, patient_id="mrn", quasi_identifiers=["age"], min_k=3))
    assert "below the minimum 3" in text
    strict_site = site.replace(workspace=site.workspace.replace(min_k=4))
    spec = make_spec(patients_csv, COLUMNS, patient_id="mrn", min_k=3)
    with pytest.raises(IngestRefused, match="min_k = 3 is below the site's minimum 4; a spec may only raise it"):
        ing.ingest(strict_site, spec, operator="t")


def test_refuses_ragged_rows_by_line(site, tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("mrn,score\n000101,1\n000102,2,extra\n000103,3\n000104\n")
    text = refusal(site, make_spec(p, {"mrn": "pseudonym", "score": "keep"}))
    assert "r.csv line 3: 3 fields where the header has 2" in text and "r.csv line 5: 1 fields" in text


def test_refuses_bad_encoding_by_line(site, tmp_path):
    p = tmp_path / "e.csv"
    p.write_bytes("mrn,city\n000101,Berlin\n000102,M\xfcnchen\n".encode("latin-1"))
    text = refusal(site, make_spec(p, {"mrn": "pseudonym", "city": "keep"}))
    assert "e.csv line 3: not valid utf-8 text" in text and 'encoding = "latin-1"' in text
    # ... and with the encoding named, it goes through
    spec = make_spec(p, {"mrn": "pseudonym", "city": "keep"}, encoding="latin-1")
    assert {r["city"] for r in published_rows(ing.ingest(site, spec, operator="t").path)} == {"Berlin", "München"}


def test_refuses_values_that_do_not_parse_by_row_and_line(site, tmp_path):
    rows = [list(r) for r in PATIENTS]
    rows[4][3] = "2021-13-45"
    rows[1][4] = "thirty"
    src = write_csv(tmp_path / "bad.csv", HEADER, rows)
    text = refusal(site, make_spec(src, COLUMNS, patient_id="mrn"))
    assert "column 'diagnosed', row 5: not an ISO date" in text and "(line 6 of the CSV)" in text
    assert "column 'age', row 2: not a number" in text
    assert "2021-13-45" not in text and "thirty" not in text


def test_refuses_a_date_whose_patient_is_unknown(site, tmp_path):
    rows = [list(r) for r in PATIENTS]
    rows[2][0] = ""
    src = write_csv(tmp_path / "nopid.csv", HEADER, rows)
    text = refusal(site, make_spec(src, COLUMNS, patient_id="mrn"))
    assert "column 'diagnosed', row 3: has a date but the patient id is missing" in text


def test_refuses_declared_types_that_do_not_parse(site, tmp_path):
    src = write_csv(tmp_path / "t.csv", ["mrn", "grade"], [["000101", "2"], ["000102", "II"]])
    text = refusal(site, make_spec(src, {"mrn": "pseudonym", "grade": {"action": "keep", "type": "int"}}))
    assert "column 'grade', row 2: does not parse as int" in text


def test_refuses_projects_and_datasets_the_site_does_not_have(site, patients_csv):
    with pytest.raises(IngestRefused, match="no project 'radiology'"):
        ing.ingest(site, make_spec(patients_csv, COLUMNS, patient_id="mrn", project="radiology"), operator="t")
    with pytest.raises(IngestRefused, match="'imaging' is not one of the datasets of project 'oncology'"):
        ing.ingest(site, make_spec(patients_csv, COLUMNS, patient_id="mrn", dataset="imaging"), operator="t")
    assert not site.data_root.exists()


def test_refuses_missing_or_exposed_key(site, patients_spec):
    os.chmod(site.key_file, 0o644)
    with pytest.raises(IngestRefused, match="readable by group or others"):
        ing.ingest(site, patients_spec, operator="t")
    site.key_file.unlink()
    with pytest.raises(IngestRefused, match="no pseudonymisation key"):
        ing.ingest(site, patients_spec, operator="t")
    assert_nothing_published(site)


def test_a_new_key_changes_pseudonyms_and_shows_in_the_manifest(site, patients_spec):
    v1 = ing.ingest(site, patients_spec, operator="t")
    site.key_file.unlink()
    keys.ensure_key(site)
    v2 = ing.ingest(site, patients_spec, operator="t")
    assert v1.manifest["key_id"] != v2.manifest["key_id"]
    assert published_rows(v1.path)[0]["patient"] != published_rows(v2.path)[0]["patient"]


def test_skip_unchanged_and_dry_run(site, patients_spec):
    out = ing.ingest(site, patients_spec, operator="t", dry_run=True)
    assert out.table.num_rows == 6 and out.info["k"] == 2
    assert_nothing_published(site)
    assert ing.ingest(site, patients_spec, operator="t", skip_unchanged=True).version == 1
    assert ing.ingest(site, patients_spec, operator="t", skip_unchanged=True) is None
    patients_spec.source.write_text(patients_spec.source.read_text() + "000105,X Y,x@y.example,2022-01-01,70,12000,7\n")
    assert ing.ingest(site, patients_spec, operator="t", skip_unchanged=True).version == 2


def test_parquet_source(site, tmp_path, patients_csv):
    import pyarrow.csv as pcsv

    table = pcsv.read_csv(
        patients_csv, convert_options=pcsv.ConvertOptions(column_types={"mrn": "string", "diagnosed": "date32"})
    )
    pq.write_table(table, tmp_path / "p.parquet")
    spec = make_spec(tmp_path / "p.parquet", COLUMNS, patient_id="mrn")
    from_parquet = published_rows(ing.ingest(site, spec, operator="t").path)
    csv_spec = make_spec(patients_csv, COLUMNS, patient_id="mrn", dataset="gbsg2")
    assert from_parquet == published_rows(ing.ingest(site, csv_spec, operator="t").path)


def test_parquet_source_with_dictionaries_and_row_groups(site, tmp_path, patients_csv):
    # Text columns are read as dictionaries; a dictionary may hold values no row uses (here "000999"),
    # which must neither count as a patient nor have its pseudonym published.
    import pyarrow as pa
    import pyarrow.csv as pcsv

    from paitient.rules import pseudonyms as tf

    table = pcsv.read_csv(
        patients_csv,
        convert_options=pcsv.ConvertOptions(
            column_types={"mrn": "string", "diagnosed": "date32", "postcode": "string"}
        ),
    )
    mrn = table.column("mrn").combine_chunks()
    dictionary = pa.array(["000999"] + sorted(set(mrn.to_pylist())))
    codes = pa.array([dictionary.to_pylist().index(v) for v in mrn.to_pylist()], pa.int32())
    table = table.set_column(0, "mrn", pa.DictionaryArray.from_arrays(codes, dictionary))
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=4)
    pub = ing.ingest(site, make_spec(tmp_path / "d.parquet", COLUMNS, patient_id="mrn"), operator="t")
    pq.write_table(table.set_column(0, "mrn", mrn), tmp_path / "p.parquet")
    plain = ing.ingest(
        site, make_spec(tmp_path / "p.parquet", COLUMNS, patient_id="mrn", dataset="gbsg2"), operator="t"
    )
    assert published_rows(pub.path) == published_rows(plain.path)
    assert pub.manifest["patients"] == 4 and pub.manifest["rows"] == 6
    pkey = keys.project_key(keys.load_master_key(site), "oncology")
    unused = tf.pseudonymise(pa.array(["000999"]), pkey).dictionary[0].as_py()
    assert unused.encode() not in (pub.path / "data.parquet").read_bytes()


def test_no_dictionary_publishes_values_that_no_published_row_holds(site, tmp_path):
    # pandas Categoricals keep their whole category list: names, addresses and an insurance number of
    # people who are not in this table sit in the Parquet dictionaries of kept, undeclared, generalised
    # and rare-to-other columns, and in the patient id's
    import pandas as pd
    import pyarrow as pa

    others = ["Hauptstraße 5, Berlin", "Erika Mustermann", "Z123456789"]
    n = 12
    pd.DataFrame(
        {
            "mrn": pd.Categorical(
                [f"{i % 6:06d}" for i in range(n)], categories=[f"{i:06d}" for i in range(6)] + others
            ),
            "age": [40 + i for i in range(n)],
            "ward": pd.Categorical(["A", "B"] * (n // 2), categories=["A", "B", *others]),
            "site": pd.Categorical(["north"] * n, categories=["north", *others]),
            "postcode": pd.Categorical(["10115"] * n, categories=["10115", "99999 Erika Mustermann"]),
            "unit": pd.Categorical(["icu"] * n, categories=["icu", *others]),
        }
    ).to_parquet(tmp_path / "cat.parquet", index=False)
    columns = {
        "mrn": "pseudonym",
        "age": {"action": "generalise", "method": "age_band", "width": 10},
        "ward": "keep",
        "postcode": {"action": "generalise", "method": "prefix", "length": 2},
        "unit": {"action": "generalise", "method": "rare", "min_count": 2},
    }
    pub = ing.ingest(site, make_spec(tmp_path / "cat.parquet", columns, patient_id="mrn"), operator="t")
    path = pub.path / "data.parquet"
    names = pq.read_schema(path).names
    assert names == ["mrn", "age", "ward", "site", "postcode", "unit"]
    table = pq.ParquetFile(path, read_dictionary=names).read()
    for name in names:
        column = table.column(name)
        assert pa.types.is_dictionary(column.type), name
        used = set(column.cast(column.type.value_type).to_pylist())
        for chunk in column.chunks:
            assert set(chunk.dictionary.to_pylist()) <= used, name
    assert set(table.column("site").cast(pa.string()).to_pylist()) == {"north"}
    assert sorted(table.column("age").chunk(0).dictionary.to_pylist()) == ["40-49", "50-59"]  # not 0-9 .. 90+
    raw = path.read_bytes()
    for other in others:
        assert other.encode() not in raw
    assert all(o not in json.dumps(pub.manifest) for o in others)


@pytest.mark.parametrize("declared", [False, True])
def test_refuses_a_rename_onto_another_source_column(site, tmp_path, declared):
    # the raw record number in a column called "patient" must not replace the pseudonyms renamed to it
    rows = [[f"{4100000 + i // 2}", f"{4100000 + i // 2}", "2021-06-01"] for i in range(10)]
    src = write_csv(tmp_path / "r.csv", ["mrn", "patient", "diagnosed"], rows)
    columns = {"mrn": {"action": "pseudonym", "rename": "patient"}, "diagnosed": "date_shift"}
    if declared:  # renamed away, the raw column still carries the name in the source: also refused
        columns["patient"] = {"action": "keep", "rename": "patient_raw"}
    text = refusal(site, make_spec(src, columns, patient_id="mrn", strict=False))
    assert "[columns] 'mrn' is renamed to 'patient', but the source also has a column 'patient'" in text
    assert "rename 'mrn' to a name no other column has, or drop the other column (patient = \"drop\")" in text
    # dropping the raw column makes the name free
    columns["patient"] = "drop"
    pub = ing.ingest(site, make_spec(src, columns, patient_id="mrn"), operator="t")
    assert pq.read_schema(pub.path / "data.parquet").names == ["patient", "diagnosed"]
    assert all(p.startswith("P-") for p in pq.read_table(pub.path / "data.parquet").column("patient").to_pylist())


def test_two_columns_never_come_out_under_one_name_even_unchecked(site, tmp_path, monkeypatch):
    # the transform loop itself refuses a second column for a name, should the check before it miss one
    src = write_csv(tmp_path / "r.csv", ["mrn", "patient"], [["000101", "000101"], ["000102", "000102"]])
    spec = make_spec(src, {"mrn": {"action": "pseudonym", "rename": "patient"}}, strict=False)
    monkeypatch.setattr(ing, "_collisions", lambda spec, table: [])
    with pytest.raises(IngestRefused, match="two columns would come out as 'patient'; rename one of them"):
        ing.transform(site, spec, ing.readers.read_csv(src, spec), keys.load_master_key(site))


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_dropped_patient_id_still_shifts_dates_and_counts_k_but_is_not_published(site, tmp_path, patients_csv, fmt):
    src = patients_csv
    if fmt == "parquet":
        import pyarrow.csv as pcsv

        table = pcsv.read_csv(patients_csv, convert_options=pcsv.ConvertOptions(column_types={"mrn": "string"}))
        pq.write_table(table, src := tmp_path / "p.parquet")
    dropped = make_spec(src, {**COLUMNS, "mrn": "drop"}, patient_id="mrn", quasi_identifiers=["age", "postcode"])
    pub = ing.ingest(site, dropped, operator="t")
    kept = ing.ingest(site, make_spec(src, COLUMNS, patient_id="mrn", dataset="gbsg2"), operator="t")
    assert pq.read_schema(pub.path / "data.parquet").names == ["diagnosed", "age", "postcode", "score"]
    # the same per-patient offsets as when the id is published as a pseudonym
    assert [r["diagnosed"] for r in patients_rows(pub.path)] == [r["diagnosed"] for r in patients_rows(kept.path)]
    assert pub.manifest["patients"] == 4 and pub.manifest["k"] == 2 and pub.manifest["k_unit"] == "patients"
    assert pub.manifest["dropped"] == ["mrn", "name", "email"]
    assert b"000101" not in (pub.path / "data.parquet").read_bytes()


def test_refuses_an_empty_source(site, tmp_path):
    empty = write_csv(tmp_path / "empty.csv", HEADER, [])
    assert "empty.csv holds no data rows" in refusal(site, make_spec(empty, COLUMNS, patient_id="mrn"))


def test_refuses_undeclared_real_dates(site, tmp_path):
    src = write_csv(tmp_path / "d.csv", ["mrn", "admitted"], [["000101", "2020-01-02"], ["000102", "2020-02-03"]])
    text = refusal(site, make_spec(src, {"mrn": "pseudonym"}))
    assert "column 'admitted' is not in the spec and has values like real dates" in text and '"date_shift"' in text


@pytest.mark.parametrize(
    "form, rule",
    [
        ("%d.%m.%Y", '{ action = "date_shift", format = "%d.%m.%Y" }'),
        ("%d/%m/%Y", '{ action = "date_shift", format = "%d/%m/%Y" }'),
        ("%Y%m%d", '{ action = "date_shift", format = "%Y%m%d" }'),  # read as a number
        ("%d %b %Y", '{ action = "date_shift", format = "%d %b %Y" }'),
    ],
)
def test_refuses_undeclared_real_dates_in_other_forms_and_its_advice_publishes_them_shifted(site, tmp_path, form, rule):
    import tomllib

    days = [dt.date(2021, 1, 1) + dt.timedelta(days=37 * i % 365) for i in range(30)]
    written = [int(d.strftime(form)) if form == "%Y%m%d" else d.strftime(form) for d in days]
    rows = [[f"{i % 10:06d}", w, i] for i, w in enumerate(written)]  # "row": to match published rows back
    src = write_csv(tmp_path / "d.csv", ["mrn", "admitted", "row"], rows)
    text = refusal(site, make_spec(src, {"mrn": "pseudonym"}, patient_id="mrn"))
    assert "column 'admitted' is not in the spec and has values like real dates" in text
    assert f"declare it as a date in [columns] (admitted = {rule}, or generalise it to years), or drop it" in text
    declared = {"mrn": "pseudonym", "admitted": tomllib.loads(f"r = {rule}")["r"], "row": "keep"}
    pub = ing.ingest(site, make_spec(src, declared, patient_id="mrn"), operator="t")
    published = in_source_order(published_rows(pub.path), "row", list(range(len(days))))
    shifted = [r["admitted"] for r in published]
    moved = [(s - d).days for s, d in zip(shifted, days, strict=True)]
    assert all(m != 0 and abs(m) <= 180 for m in moved)
    assert moved[:10] == moved[10:20] == moved[20:]  # one offset per patient


def test_a_csv_larger_than_one_read_block(site, tmp_path):
    n = 60_000  # ~3 MB: several Arrow chunks per column
    rows = [
        [
            f"{i % 7000:06d}",
            f"Person{i % 7000} Name",
            f"p{i % 7000}@mail.example",
            f"2020-{1 + i % 12:02d}-{1 + i % 28:02d}",
            20 + i % 60,
            f"1{i % 10}115",
            i / 10,
        ]
        for i in range(n)
    ]
    src = write_csv(tmp_path / "big.csv", HEADER, rows)
    pub = ing.ingest(site, make_spec(src, COLUMNS, patient_id="mrn", quasi_identifiers=["age"]), operator="t")
    t = pq.read_table(pub.path / "data.parquet")
    assert t.num_rows == n and pub.manifest["patients"] == 7000
    patient_of_score = dict(zip(t.column("score").to_pylist(), t.column("patient").to_pylist(), strict=True))
    assert patient_of_score[(n - 1) / 10] == patient_of_score[((n - 1) % 7000) / 10]  # source rows 59999, 4999


def test_k_counts_a_patient_once_when_the_source_dictionary_holds_the_id_twice(site, tmp_path):
    import pyarrow as pa

    mrn = pa.DictionaryArray.from_arrays(pa.array([0, 1], pa.int32()), pa.array(["000101", "000101"]))
    table = pa.table({"mrn": mrn, "age": [34, 36]})
    spec = make_spec(
        tmp_path / "t.parquet",
        {"mrn": "pseudonym", "age": {"action": "generalise", "method": "age_band", "width": 50}},
        patient_id="mrn",
        quasi_identifiers=["age"],
    )
    master = keys.load_master_key(site)
    with pytest.raises(IngestRefused) as e:  # one patient in the group, not two
        ing.transform(site, spec, table, master)
    assert "k-anonymity 1 is below the minimum 2" in str(e.value)
    ok = ing.transform(site, replace(spec, quasi_identifiers=[]), table, master)
    assert ok.info["patients"] == 1 and ok.table.column("mrn")[0] == ok.table.column("mrn")[1]


def _ranks(values: list) -> list[int]:
    order = sorted(range(len(values)), key=values.__getitem__)
    rank = [0] * len(values)
    for r, i in enumerate(order):
        rank[i] = r
    return rank


def _spearman(a: list, b: list) -> float:
    ra, rb = _ranks(a), _ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb, strict=True)) / (n * (n * n - 1))


def test_published_row_order_carries_nothing_of_the_source_order(site, tmp_path):
    import random

    import pyarrow as pa

    # an export sorted by record number (so by rank of patient), 400 rows of 100 patients; "row" is the
    # source position, kept so the test can see where each source row went
    rng = random.Random(7)
    mrns = sorted(f"{rng.randint(1, 99_999_999):08d}" for _ in range(100))
    rows = [
        [mrns[i // 4], f"2021-{1 + i % 12:02d}-{1 + i % 28:02d}", 30 + i % 40, f"1{i % 3}115", i] for i in range(400)
    ]
    header = ["mrn", "admitted", "age", "postcode", "row"]
    columns = {
        "mrn": {"action": "pseudonym", "rename": "patient"},
        "admitted": "date_shift",
        "age": {"action": "generalise", "method": "age_band", "width": 50},
        "postcode": {"action": "generalise", "method": "prefix", "length": 1},
        "row": "keep",
    }
    src = write_csv(tmp_path / "sorted.csv", header, rows)
    shuffled = rows[:]
    rng.shuffle(shuffled)
    src2 = write_csv(tmp_path / "shuffled.csv", header, shuffled)

    def publish(source, project, dataset):
        spec = make_spec(source, columns, patient_id="mrn", project=project, dataset=dataset)
        return pq.read_table(ing.ingest(site, spec, operator="t").path / "data.parquet")

    onc = publish(src, "oncology", "breast_cancer")
    cardio = publish(src, "cardiometabolic", "diabetes")
    source_order = list(range(400))
    a, b = onc.column("row").to_pylist(), cardio.column("row").to_pylist()
    assert sorted(a) == sorted(b) == source_order
    assert a != source_order and b != source_order and a != b
    # published position against source position, and one project's order against the other's: no relation
    assert abs(_spearman(list(range(400)), a)) < 0.25
    position_in_b = {row: i for i, row in enumerate(b)}
    assert abs(_spearman(list(range(400)), [position_in_b[row] for row in a])) < 0.25
    # the same project again, and the same rows exported in another order: the very same table
    assert publish(src, "oncology", "breast_cancer").equals(onc)
    assert publish(src2, "oncology", "gbsg2").equals(onc)
    # dictionaries list their values in the order published rows first hold them, not the source's
    path = dataset_dir(site.data_root, "oncology", "breast_cancer") / "current" / "data.parquet"
    for name in ("patient", "age", "postcode"):
        column = pq.ParquetFile(path, read_dictionary=[name]).read().column(name)
        assert isinstance(column.type, pa.DictionaryType)
        for chunk in column.chunks:
            assert chunk.dictionary.to_pylist() == list(dict.fromkeys(chunk.to_pylist())), name
    source_patients = pseudonyms(site, "oncology", list(dict.fromkeys(r[0] for r in rows)))
    assert list(dict.fromkeys(onc.column("patient").to_pylist())) != source_patients


def test_a_parquet_sources_dictionary_order_is_not_published(site, tmp_path):
    import pandas as pd

    # a warehouse extract: record numbers as a Categorical whose categories are sorted, rows shuffled
    mrns = [f"{i * 7919 % 100_000:08d}" for i in range(60)]
    df = pd.DataFrame(
        {"mrn": pd.Categorical(mrns, categories=sorted(set(mrns))), "age": [30 + i % 40 for i in range(60)]}
    ).sample(frac=1, random_state=3)
    df.to_parquet(src := tmp_path / "src.parquet", index=False)
    spec = make_spec(src, {"mrn": {"action": "pseudonym", "rename": "patient"}, "age": "keep"}, patient_id="mrn")
    pub = ing.ingest(site, spec, operator="t")
    published = pq.ParquetFile(pub.path / "data.parquet", read_dictionary=["patient"]).read()
    dictionary = published.column("patient").chunk(0).dictionary.to_pylist()
    assert dictionary == list(dict.fromkeys(published.column("patient").to_pylist()))
    assert dictionary != pseudonyms(site, "oncology", sorted(set(mrns)))
    assert published.column("patient").to_pylist() != pseudonyms(site, "oncology", list(df["mrn"].astype(str)))


def test_a_failure_after_the_switch_keeps_the_current_versions_row_index(site, patients_csv):
    """A publication that fails after ``current`` was switched (an fsync of the folder, a signal) leaves the
    new version current; ingest removed its row-detection index all the same, and the egress gate then had no
    index to match that version's rows by. The index of a version that became current stays."""
    from paitient.services.data.publish import Publisher
    from paitient.services.data.rowindex import index_dir

    class SwitchThenFail(Publisher):
        def switch_current(self, ds, version):
            super().switch_current(ds, version)
            raise OSError(5, "EIO from fsync, after the switch")

    publisher = SwitchThenFail(
        site.data_root, site.state_dir / "locks", group_of=lambda project: access.project_gid(site, project)
    )
    with pytest.raises(OSError, match="after the switch"):
        ing.ingest(site, make_spec(patients_csv, COLUMNS, patient_id="mrn"), operator="t", publisher=publisher)
    ds = dataset_dir(site.data_root, "oncology", "breast_cancer")
    assert current_version(ds) == 1
    assert index_dir(site, "oncology", "breast_cancer", 1).is_dir()


def test_the_catalogue_counts_the_patients_who_hold_a_category(site, tmp_path):
    """Ingest counts categories by patient: a ward one patient holds on three rows is no category at a
    minimum of 2, the wards two patients hold are."""
    rows = [["000101", "a", 1.0], ["000102", "a", 2.0], ["000103", "b", 3.0], ["000104", "b", 4.0]]
    rows += [["000105", "rare", 5.0 + i] for i in range(3)]
    src = write_csv(tmp_path / "w.csv", ["mrn", "ward", "score"], rows)
    spec = make_spec(src, {"mrn": "pseudonym", "ward": "keep", "score": "keep"}, patient_id="mrn")
    pub = ing.ingest(site, spec, operator="t")
    ward = next(c for c in pub.manifest["columns"] if c["name"] == "ward")
    assert "categories" not in ward
    without = write_csv(tmp_path / "w2.csv", ["mrn", "ward", "score"], rows[:4])
    again = ing.ingest(
        site, make_spec(without, {"mrn": "pseudonym", "ward": "keep", "score": "keep"}, patient_id="mrn"), operator="t"
    )
    assert next(c for c in again.manifest["columns"] if c["name"] == "ward")["categories"] == ["a", "b"]


def test_a_column_named_twice_once_with_spaces_is_refused(site, tmp_path):
    """``mrn, mrn`` (one name once the spaces go, as the spec reads names) gave two columns ``mrn`` and a
    KeyError of Arrow's instead of a refusal."""
    p = tmp_path / "d.csv"
    p.write_text("mrn, mrn,score\n000101,000101,1\n")
    text = refusal(site, make_spec(p, {"mrn": "pseudonym", "score": "keep"}))
    assert "d.csv line 1: column(s) named twice: mrn" in text


def test_an_error_no_refusal_foresaw_is_on_the_trail_by_its_kind_alone(site, patients_csv, monkeypatch):
    """An error inside ingest that is no refusal (a bug, a library's own error, which may quote a value) ended
    the attempt with no audit record; it is recorded as ``error``, naming the error's kind, not its text."""

    def broken(*args, **kwargs):
        raise KeyError("Anna Müller")

    monkeypatch.setattr(ing, "transform", broken)
    with pytest.raises(KeyError):
        ing.ingest(site, make_spec(patients_csv, COLUMNS, patient_id="mrn"), operator="t")
    assert_nothing_published(site)
    (rec,) = audit_records(site)
    assert rec["outcome"] == "error" and rec["details"]["error"] == "KeyError"
    assert "Anna" not in json.dumps(rec, ensure_ascii=False)
