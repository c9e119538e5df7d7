"""The kernel side: list, load and show the datasets under PAITIENT_DATA_DIR, in both layouts."""

import shutil

import pandas as pd
import pyarrow as pa
import pytest

from paitient import data
from paitient.catalogue import scan
from paitient.services.data import ingest as ing

from .conftest import COLUMNS, make_spec


@pytest.fixture
def published(site, patients_csv):
    """breast_cancer and gbsg2 in oncology, and a diabetes dataset in cardiometabolic (named gbsg2 too)."""
    for project, dataset in (("oncology", "breast_cancer"), ("oncology", "gbsg2"), ("cardiometabolic", "diabetes")):
        spec = make_spec(
            patients_csv,
            COLUMNS,
            patient_id="mrn",
            project=project,
            dataset=dataset,
            quasi_identifiers=["age"],
            description=f"<b>{dataset}</b> & co",
        )
        ing.ingest(site, spec, operator="t")
    return site


def test_scan_reads_the_host_layout(published):
    infos = scan(published.data_root)
    assert [i.qualified for i in infos] == ["cardiometabolic/diabetes", "oncology/breast_cancer", "oncology/gbsg2"]
    assert infos[0].version == 1 and infos[0].rows == 6 and infos[0].k == 2
    assert infos[0].columns == ["patient", "diagnosed", "age", "postcode", "score"]


@pytest.fixture
def sandbox_view(published, tmp_path, monkeypatch):
    """What a kernel sees: /data/<project>/<dataset> is the current version's folder itself."""
    view = tmp_path / "sandbox-data"
    for info in scan(published.data_root):
        shutil.copytree(info.path.resolve(), view / info.project / info.name)
    monkeypatch.setenv("PAITIENT_DATA_DIR", str(view))
    return view


def test_load_returns_pandas_or_arrow(sandbox_view):
    df = data.load("breast_cancer")
    assert isinstance(df, pd.DataFrame) and len(df) == 6 and list(df.columns)[0] == "patient"
    assert pd.api.types.is_datetime64_any_dtype(df["diagnosed"])
    assert sorted(df["age"].tolist()) == ["0-49"] * 3 + ["50-89"] * 3  # plain values, not categoricals
    table = data.load("oncology/gbsg2", as_arrow=True)
    assert isinstance(table, pa.Table) and table.num_rows == 6 and table.schema.field("patient").type == pa.string()


def test_load_by_project_and_clear_errors(sandbox_view):
    shutil.copytree(sandbox_view / "oncology" / "gbsg2", sandbox_view / "cardiometabolic" / "gbsg2")
    with pytest.raises(
        data.DatasetNotFound,
        match=r"exists in several projects; say which: "
        r"load\('gbsg2', project='cardiometabolic'\) or load\('gbsg2', project='oncology'\)",
    ):
        data.load("gbsg2")
    assert len(data.load("gbsg2", project="cardiometabolic")) == 6
    with pytest.raises(
        data.DatasetNotFound,
        match=r"no dataset 'lung'; available: cardiometabolic/diabetes, "
        r"cardiometabolic/gbsg2, oncology/breast_cancer, oncology/gbsg2",
    ):
        data.load("lung")
    with pytest.raises(data.DatasetNotFound, match="no dataset 'diabetes' in project 'oncology'"):
        data.load("diabetes", project="oncology")


def test_only_what_is_under_the_data_dir_is_seen(sandbox_view, monkeypatch, tmp_path):
    shutil.rmtree(sandbox_view / "cardiometabolic")
    assert [i.qualified for i in data.datasets()] == ["oncology/breast_cancer", "oncology/gbsg2"]
    with pytest.raises(data.DatasetNotFound):
        data.load("diabetes")
    monkeypatch.setenv("PAITIENT_DATA_DIR", str(tmp_path / "nothing"))
    assert data.datasets() == []


def test_catalog_widget_lists_and_escapes(sandbox_view, monkeypatch, tmp_path):
    import ipywidgets

    w = data.catalog()
    assert isinstance(w, ipywidgets.HTML)
    for text in ("breast_cancer", "gbsg2", "diabetes", "cardiometabolic", "&lt;b&gt;gbsg2&lt;/b&gt; &amp; co"):
        assert text in w.value
    assert "<b>gbsg2" not in w.value
    assert w.value.count("<tr title=") == 3
    monkeypatch.setenv("PAITIENT_DATA_DIR", str(tmp_path / "empty"))
    assert "No datasets under" in data.catalog().value


def test_importing_paitient_data_stays_light():
    import subprocess
    import sys

    code = (
        "import sys, paitient.kernel.data; "
        "print(sorted(m for m in ('ipywidgets', 'pyarrow', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
