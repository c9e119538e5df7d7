"""What a file is, by its bytes: data formats are never served whatever their name; text and notebooks are."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import pickle
import sqlite3
import struct
import tarfile
import zipfile
import zlib
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


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _images() -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    im = Image.new("RGB", (48, 32), (10, 20, 30))
    out = {}
    for fmt, kw in (("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}), ("GIF", {})):
        out[f"{fmt} {kw}"] = _bytes(lambda b, fmt=fmt, kw=kw: im.save(b, format=fmt, **kw))
    for mode in ("P", "LA", "1", "I;16"):
        out[f"PNG {mode}"] = _bytes(lambda b, mode=mode: im.convert(mode).save(b, format="PNG"))
    frames = [Image.new("RGB", (48, 32), (200, 0, 0))]
    out["GIF animated"] = _bytes(lambda b: im.save(b, format="GIF", save_all=True, append_images=frames))
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3])
    for fmt in ("png", "jpg", "gif"):
        out[f"matplotlib {fmt}"] = _bytes(lambda b, fmt=fmt: fig.savefig(b, format=fmt))
    plt.close(fig)
    # interlaced (Adam7): seven passes of scanlines, each led by its filter byte
    raw = b""
    for x0, y0, dx, dy in (
        (0, 0, 8, 8),
        (4, 0, 8, 8),
        (0, 4, 4, 8),
        (2, 0, 4, 4),
        (0, 2, 2, 4),
        (1, 0, 2, 2),
        (0, 1, 1, 2),
    ):
        w, h = (13 - x0 + dx - 1) // dx, (11 - y0 + dy - 1) // dy
        raw += (b"\x00" + bytes(range(w * 3))) * h if w > 0 and h > 0 else b""
    out["PNG interlaced"] = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", 13, 11, 8, 2, 0, 0, 1))
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )
    return out


def test_images_of_every_kind_a_plot_is_saved_as_are_images():
    for name, data in _images().items():
        found = sniff(data)
        assert found.kind is Kind.IMAGE and found.served, (name, found)


def test_a_table_behind_an_images_magic_number_is_data_not_an_image(df):
    """Eight bytes a kernel writes in front of a CSV made it an image, served whole (base64). An image is one
    only when every byte has its place in that format: a table before, inside or after it is data."""
    csv = df.to_csv().encode()
    images = _images()
    png, jpeg, gif = images["PNG {}"], images["JPEG {}"], images["GIF {}"]
    iend = png.rindex(b"IEND") - 4
    ihdr = png[8:33]
    forged = {
        "csv behind the PNG signature": b"\x89PNG\r\n\x1a\n" + csv,
        "csv behind the JPEG start": b"\xff\xd8\xff\xe0" + csv,
        "csv behind the GIF header": b"GIF89a" + csv,
        "csv after IEND": png + csv,
        "csv after JPEG's end of image": jpeg + csv,
        "csv after GIF's trailer": gif + csv,
        "csv in a private PNG chunk": png[:iend] + _chunk(b"csVd", csv) + png[iend:],
        "csv in an APNG frame chunk": png[:iend] + _chunk(b"fdAT", csv) + png[iend:],
        "csv as IDAT (not compressed pixels)": png[:33] + _chunk(b"IDAT", csv) + _chunk(b"IEND", b""),
        "csv stored in IDAT, more than IHDR declares": png[:33]
        + _chunk(b"IDAT", zlib.compress(csv, 0))
        + _chunk(b"IEND", b""),
        "csv in a chunk whose CRC does not match": png[:iend] + _chunk(b"tEXt", b"k\0" + csv)[:-4] + b"\0\0\0\0"
        + png[iend:],
        "no IHDR first": b"\x89PNG\r\n\x1a\n" + _chunk(b"tEXt", b"k\0" + csv) + ihdr + png[33:],
    }  # fmt: skip
    for name, data in forged.items():
        found = sniff(data)
        assert found.kind is Kind.DATA and not found.served, (name, found)
        assert found.what == "a file that starts like an image but is not one", name


def test_what_an_image_carries_besides_its_pixels_is_read_as_text(df):
    csv = df.to_csv().encode()
    png = _images()["PNG {}"]
    iend = png.rindex(b"IEND") - 4
    texts = {
        "tEXt": _chunk(b"tEXt", b"Comment\0" + csv),
        "zTXt": _chunk(b"zTXt", b"Comment\0\0" + zlib.compress(csv)),
        "iTXt compressed": _chunk(b"iTXt", b"Comment\0\1\0en\0\0" + zlib.compress(csv)),
        "iCCP": _chunk(b"iCCP", b"profile\0\0" + zlib.compress(csv)),
        "eXIf": _chunk(b"eXIf", csv),
    }
    for name, chunk in texts.items():
        found = sniff(png[:iend] + chunk + png[iend:])
        assert found.kind is Kind.IMAGE and csv in found.carried, name
    jpeg = _images()["JPEG {}"]
    found = sniff(jpeg[:2] + b"\xff\xfe" + struct.pack(">H", 2 + len(csv)) + csv + jpeg[2:])  # a COM segment
    assert found.kind is Kind.IMAGE and csv in found.carried
