"""Demo data for `paitient up`: real tables, generated identities, ingested for real, once."""

import os
import stat

import pandas as pd
import pyarrow.parquet as pq
import pytest

from paitient import data
from paitient.config import load
from paitient.ops.demodata import demo_sources, gbsg2_table, publish_demo

from .conftest import pseudonyms


def with_pseudonyms(site, project, raw):
    """The raw export with each row's pseudonym (published rows come in a keyed order, not the export's)."""
    return raw.assign(patient=pseudonyms(site, project, list(raw["mrn"])))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    site = load(None, overrides={"workspace": {"state_dir": str(tmp_path_factory.mktemp("demo") / "state")}})
    return site, publish_demo(site)


def test_publishes_the_demo_projects_datasets(demo):
    site, done = demo
    assert done == ["oncology/breast_cancer@v1", "oncology/gbsg2@v1", "cardiometabolic/diabetes@v1"]
    assert publish_demo(site) == []  # unchanged spec, source and key: nothing new
    sources = site.state_dir / "sources"
    assert stat.S_IMODE(sources.stat().st_mode) == 0o700
    assert stat.S_IMODE((sources / "oncology" / "gbsg2.csv").stat().st_mode) == 0o600
    infos = {i.qualified: i for i in data.scan(site.data_root)}
    assert {q: (i.rows, i.k >= site.workspace.min_k) for q, i in infos.items()} == {
        "oncology/breast_cancer": (569, True),
        "oncology/gbsg2": (686, True),
        "cardiometabolic/diabetes": (442, True),
    }


def test_the_gbsg2_table_read_from_its_file_is_the_one_lifelines_loads():
    from lifelines.datasets import load_gbsg2

    table = gbsg2_table()
    assert table.shape == (686, 10)
    pd.testing.assert_frame_equal(table, load_gbsg2())


def test_identifiers_are_gone_and_clinical_values_are_the_real_ones(demo):
    site, _ = demo
    raw = demo_sources()
    for project, name in (("oncology", "gbsg2"), ("oncology", "breast_cancer"), ("cardiometabolic", "diabetes")):
        folder = site.data_root / project / name / "current"
        blob = (folder / "data.parquet").read_bytes() + (folder / "manifest.json").read_bytes()
        table = pq.read_table(folder / "data.parquet")
        text = " ".join(str(v) for col in table.columns for v in col.to_pylist())
        src = raw[name]
        for col in ("mrn", "name", "street", "phone", "insurance_no"):
            for value in src[col].head(50):
                assert value not in text and value.encode() not in blob, (name, col)
        assert not {"name", "street", "phone", "insurance_no", "birth_date", "city", "mrn"} & set(table.column_names)
    os.environ["PAITIENT_DATA_DIR"] = str(site.data_root)  # the real trial values pass through unchanged
    try:
        g = data.load("gbsg2")
    finally:
        del os.environ["PAITIENT_DATA_DIR"]
    src = with_pseudonyms(site, "oncology", raw["gbsg2"]).set_index("patient").loc[g["patient"]]
    assert g["time"].tolist() == src["time"].tolist()
    assert ((g["last_followup"] - g["surgery_date"]).dt.days == g["time"]).all()  # intervals survive the shift


def test_shared_patients_link_within_a_project_and_not_across(demo):
    site, _ = demo
    raw = demo_sources()
    read = {
        n: pq.read_table(site.data_root / p / n / "current" / "data.parquet").to_pandas(date_as_object=False)
        for p, n in (("oncology", "gbsg2"), ("oncology", "breast_cancer"), ("cardiometabolic", "diabetes"))
    }
    shared_onc = set(raw["gbsg2"]["mrn"]) & set(raw["breast_cancer"]["mrn"])
    shared_cross = set(raw["diabetes"]["mrn"]) & set(raw["breast_cancer"]["mrn"])
    assert len(shared_onc) == 150 and len(shared_cross) == 60
    assert len(set(read["gbsg2"]["patient"]) & set(read["breast_cancer"]["patient"])) == 150
    oncology = set(read["breast_cancer"]["patient"]) | set(read["gbsg2"]["patient"])
    assert not set(read["diabetes"]["patient"]) & oncology
    # a shared oncology patient keeps one date offset across both tables: biopsy 7-60 days before surgery
    bc = read["breast_cancer"]
    gs = read["gbsg2"]
    b = with_pseudonyms(site, "oncology", raw["breast_cancer"]).merge(
        pd.DataFrame({"patient": bc["patient"], "shifted": bc["diagnosis_date"]}), on="patient"
    )
    g = with_pseudonyms(site, "oncology", raw["gbsg2"]).merge(
        pd.DataFrame({"patient": gs["patient"], "shifted": gs["surgery_date"]}), on="patient"
    )
    assert len(b) == len(bc) and len(g) == len(gs)
    m = b.merge(g, on="patient")
    gap_raw = (pd.to_datetime(m["surgery_date"]) - pd.to_datetime(m["diagnosis_date"])).dt.days
    assert len(m) == 150 and ((m["shifted_y"] - m["shifted_x"]).dt.days == gap_raw).all()
