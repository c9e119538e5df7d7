"""What a file is, by its bytes: data formats are never served whatever their name; text and notebooks are."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import pickle
import sqlite3
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save as save_safetensors

from paitient.rules.sniff import Kind, sniff

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def df() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "patient": [f"P-{i:016d}" for i in range(50)],
            "radius": rng.normal(14, 3, 50).round(3),
            "texture": rng.normal(19, 4, 50).round(3),
            "target": rng.integers(0, 2, 50),
        }
    )


def _bytes(write) -> bytes:
    buf = io.BytesIO()
    write(buf)
    return buf.getvalue()


def formats(df: pd.DataFrame, tmp: Path) -> dict[str, bytes]:
    db = tmp / "t.sqlite"
    with sqlite3.connect(db) as con:
        df.to_sql("t", con)
    table = pa.Table.from_pandas(df)
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as tf:
        data = df.to_csv().encode()
        info = tarfile.TarInfo("t.csv")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("t.csv", df.to_csv())
    return {
        "csv": df.to_csv().encode(),
        "csv without index": df.to_csv(index=False).encode(),
        "tsv": df.to_csv(sep="\t").encode(),
        "semicolons": df.to_csv(sep=";").encode(),
        "json lines": df.to_json(orient="records", lines=True).encode(),
        "parquet": _bytes(lambda b: pq.write_table(table, b)),
        "feather": _bytes(lambda b: feather.write_feather(table, b)),
        "arrow stream": _bytes(lambda b: pa.ipc.new_stream(b, table.schema).write_table(table)),
        "pickle 0": pickle.dumps(df.values.tolist(), protocol=0),
        "pickle 5": pickle.dumps(df, protocol=5),
        "numpy": _bytes(lambda b: np.save(b, df[["radius", "texture"]].values)),
        "npz": _bytes(lambda b: np.savez(b, x=df[["radius"]].values)),
        "torch": _bytes(lambda b: torch.save(torch.tensor(df[["radius"]].values), b)),
        "safetensors": save_safetensors({"x": torch.tensor(df[["radius"]].values)}),
        "sqlite": db.read_bytes(),
        "xlsx-like zip": zipped.getvalue(),
        "gzip": gzip.compress(df.to_csv().encode()),
        "bz2": bz2.compress(df.to_csv().encode()),
        "xz": lzma.compress(df.to_csv().encode()),
        "tar": tar.getvalue(),
    }


def test_data_formats_are_never_served_whatever_the_name(df, tmp_path):
    for name, data in formats(df, tmp_path).items():
        found = sniff(data)
        assert found.kind is Kind.DATA and not found.served, (name, found)


def test_binary_that_is_not_an_image_is_not_served():
    found = sniff(bytes(range(256)) * 10)
    assert found.kind is Kind.BINARY and not found.served


def test_notebooks_source_and_text_are_served():
    for path in [*REPO.glob("notebooks/*.ipynb")]:
        assert sniff(path.read_bytes()).kind is Kind.NOTEBOOK, path
    for path in [REPO / "README.md", *REPO.glob("extensions/paitient/rules/*.py"), REPO / "pyproject.toml"]:
        assert sniff(path.read_bytes()).kind is Kind.TEXT, path


def test_images_are_served_as_images():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2, 3])
    png = _bytes(lambda b: fig.savefig(b, format="png"))
    plt.close(fig)
    found = sniff(png)
    assert found.kind is Kind.IMAGE and found.mimetype == "image/png"


def test_a_fixed_width_table_is_text_left_to_row_detection(df):
    # df.to_string() has no delimiter: it is text, and the egress gate's row detection judges its rows.
    assert sniff(df.to_string().encode()).kind is Kind.TEXT


def test_a_notebook_is_recognised_by_its_content():
    nb = {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    assert sniff(json.dumps(nb).encode()).kind is Kind.NOTEBOOK
    assert sniff(json.dumps({"cells": []}).encode()).kind is Kind.TEXT
