"""The canonical form previews are rendered from: images re-encoded without what rides along, tables from parsed
cells, text normalised; what does not parse has no preview. And what a requester's browser gets instead."""

from __future__ import annotations

import io
import json
import struct
import time
import zlib

import pandas as pd
import pytest
from PIL import Image

from paitient.services.airlock import canonical, views
from paitient.services.airlock.canonical import NoPreview, canonical_for
from paitient.services.airlock.checks import check_image
from paitient.services.airlock.images import shown_pixels
from tests.airlock.helpers import SECRET, csv_bytes, figure_with_payload, png_chunks


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_image_is_reencoded_without_metadata_or_trailing_bytes():
    im, upload = figure_with_payload()
    kinds, trailing = png_chunks(upload)
    assert {b"tEXt", b"iTXt", b"eXIf", b"pHYs"} <= set(kinds) and trailing.startswith(b"age,sex")
    shown = canonical_for("figure", "km.png", upload)
    assert shown.kind == "image" and shown.mime == "image/png" and (shown.width, shown.height) == (64, 48)
    kinds, trailing = png_chunks(shown.data)
    assert set(kinds) == {b"IHDR", b"IDAT", b"IEND"} and kinds[0] == b"IHDR" and trailing == b""
    assert SECRET.encode() not in shown.data and b"age,sex" not in shown.data
    # The same pixels, and nothing else.
    again = Image.open(io.BytesIO(shown.data))
    assert again.info == {} and again.tobytes() == shown_pixels(im).tobytes()
    assert [line.split(" (")[0] for line in shown.beyond] == [
        "1 eXIf block",
        "1 iTXt block",
        "1 pHYs block",
        "1 tEXt block",
        f"{len(png_chunks(upload)[1])} bytes after the end of the image",
    ]
    assert all(SECRET not in line for line in shown.beyond)


def test_jpeg_exif_and_comment_are_dropped():
    im = Image.new("RGB", (32, 32), (200, 10, 10))
    exif = Image.Exif()
    exif[0x010E] = SECRET
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif, comment=SECRET.encode(), progressive=True)
    upload = buf.getvalue() + b"TRAILING" * 4
    shown = canonical_for("figure", "f.jpg", upload)
    assert set(png_chunks(shown.data)[0]) == {b"IHDR", b"IDAT", b"IEND"} and SECRET.encode() not in shown.data
    names = [line.split(" (")[0] for line in shown.beyond]
    assert "1 APP1 block" in names and "1 COM block" in names and "32 bytes after the end of the image" in names


def test_gif_shows_the_first_frame_and_names_the_others():
    frames = [Image.new("RGB", (8, 8), (i * 80, 0, 0)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], comment=SECRET.encode(), loop=0)
    shown = canonical_for("figure", "a.gif", buf.getvalue())
    assert shown.kind == "image" and SECRET.encode() not in shown.data
    assert "2 more frames (the preview shows the first)" in shown.beyond
    assert any(line.startswith("1 comment block") for line in shown.beyond)


@pytest.mark.parametrize("kind", ["figure", "other"])
def test_a_csv_behind_a_png_header_is_no_image(kind):
    upload = b"\x89PNG\r\n\x1a\n" + csv_bytes(pd.DataFrame({"age": [87, 91], "sex": ["F", "M"]}))
    with pytest.raises(NoPreview, match="no image preview: it does not decode as a PNG, JPEG or GIF image"):
        canonical_for(kind, "figure.png", upload)
    # Nor is it a table or text: its first bytes are not UTF-8.
    with pytest.raises(NoPreview, match="no table preview: figure.png: neither Parquet nor UTF-8 CSV"):
        canonical_for("table", "figure.png", upload)
    result = check_image(upload)
    assert result["status"] == "fail" and "does not decode as a PNG, JPEG or GIF image" in result["reason"]


def test_a_decompression_bomb_is_refused_before_decoding():
    def png(width: int, height: int) -> bytes:
        header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
            + chunk(b"IEND", b"")
        )

    start = time.monotonic()
    with pytest.raises(NoPreview, match="8000x8000 = 64000000 pixels, more than the 40000000 a preview decodes"):
        canonical_for("figure", "big.png", png(8000, 8000))
    with pytest.raises(NoPreview, match="this is a decompression bomb"):
        canonical_for("figure", "bomb.png", png(100_000, 100_000))
    assert time.monotonic() - start < 2  # refused from the header, nothing decoded
    assert check_image(png(100_000, 100_000))["status"] == "fail"


def test_table_cells_are_rendered_from_their_parsed_values():
    upload = (
        "stage,patients,share,alive,note\n"
        "I,007,0.50,true,plain\n"
        'II,48,1e-1,false,"a\u202eb\x07c"\n'
        "III,3,,true," + "x" * 500 + "\n"
    ).encode()
    shown = canonical_for("table", "t.csv", upload)
    t = shown.table
    assert t.columns == ("stage", "patients", "share", "alive", "note")
    assert t.types == ("text", "integer", "number", "boolean", "text")
    assert t.rows[0] == ("I", "7", "0.5", "true", "plain")  # 007 and 0.50 are numbers, not the bytes
    assert t.rows[1] == ("II", "48", "0.1", "false", "abc")  # the bidi override and the bell are gone
    assert t.rows[2][2] == "" and len(t.rows[2][4]) == canonical.PREVIEW_CELL_CHARS and t.rows[2][4][-1] == "…"
    assert json.loads(shown.data) == {
        "columns": list(t.columns),
        "types": list(t.types),
        "rows": [list(r) for r in t.rows],
        "total_rows": 3,
        "total_columns": 5,
    }


def test_tsv_by_name_and_parquet_by_content():
    df = pd.DataFrame({"site": ["a", "b"], "n": [12, 30], "when": pd.to_datetime(["2020-01-01", "2021-06-30"])})
    tsv = canonical_for("table", "t.tsv", df.to_csv(sep="\t", index=False).encode())
    assert tsv.table.columns == ("site", "n", "when") and tsv.table.rows[1][:2] == ("b", "30")
    buf = io.BytesIO()
    df.assign(blob=[b"\x00\x01", b"abc"]).to_parquet(buf)
    pq = canonical_for("other", "t.bin", buf.getvalue())
    assert pq.kind == "table" and pq.table.types == ("text", "integer", "datetime", "text")
    assert pq.table.rows[0] == ("a", "12", "2020-01-01T00:00:00", "(2 bytes)")


def test_wide_and_long_tables_show_the_first_rows_and_columns():
    df = pd.DataFrame({f"c{i}": range(300) for i in range(40)})
    t = canonical_for("table", "t.csv", csv_bytes(df)).table
    assert len(t.rows) == canonical.PREVIEW_ROWS and len(t.columns) == canonical.PREVIEW_COLUMNS
    assert (t.total_rows, t.total_columns) == (300, 40)


def test_a_parquet_file_with_too_many_cells_is_not_parsed(monkeypatch):
    buf = io.BytesIO()
    pd.DataFrame({"a": range(50), "b": range(50)}).to_parquet(buf)
    monkeypatch.setattr(canonical, "PREVIEW_MAX_CELLS", 99)
    with pytest.raises(NoPreview, match="the table has 100 cells, more than the 99 a preview parses"):
        canonical_for("table", "t.parquet", buf.getvalue())


def test_text_is_normalised_and_binary_has_no_preview():
    shown = canonical_for("other", "notes.txt", "\ufeffCafe\u0301\r\nline two\x1b[31m\n".encode())
    assert shown.kind == "text" and shown.text == "Café\nline two[31m\n" and shown.data == shown.text.encode()
    with pytest.raises(NoPreview, match="holds NUL bytes"):
        canonical_for("other", "x.bin", b"abc\x00def")
    with pytest.raises(NoPreview, match="neither an image, a table nor UTF-8 text"):
        canonical_for("other", "x.bin", b"\xff\xfe\xfa")
    with pytest.raises(NoPreview, match="model weights have no preview"):
        canonical_for("weights", "m.safetensors", b"whatever")


def test_figure_check_names_what_rides_along():
    _, upload = figure_with_payload()
    r = check_image(upload)
    assert (
        r["status"] == "review" and "1 tEXt block" in r["reason"] and "bytes after the end of the image" in r["reason"]
    )
    assert SECRET not in r["reason"] and r["details"]["width"] == 64
    clean = io.BytesIO()
    Image.new("RGB", (4, 4)).save(clean, "PNG")
    assert check_image(clean.getvalue())["status"] == "pass"


def test_the_requesters_view_quotes_nothing_a_check_read_or_the_kernel_wrote():
    checks = [
        {
            "check": "minimum_count",
            "status": "fail",
            "reason": "1 cell(s) count fewer than 10 individuals; merge categories or suppress these cells",
            "details": {"threshold": 10, "cells": [{"row": 2, "column": "HIV_positive", "value": 3.0}]},
        },
        {"check": "readable", "status": "fail", "reason": "t.csv: not a readable CSV file (line 3: 'Smith, J')"},
        {"check": "format", "status": "fail", "reason": "tensor 'age=87 sex=F': unknown or missing dtype"},
        {"check": "recipe", "status": "fail", "reason": "unknown recipe keys ['Kestrel-9,120']"},
        {
            "check": "training_record",
            "status": "pass",
            "reason": "trained with differential privacy on x: epsilon=0.123457",
            "details": {"record": {"record.noise": 1.2345678901234567, "record.payload": 4242424242}},
        },
        {"check": "row_level", "status": "pass", "reason": "x" * 1000, "details": {"shared_columns": ["a", "b"]}},
        {"check": "Smith-J", "status": "Smith-K", "reason": "a check of another version"},
    ]
    info = views.requester_info(
        {"justification": "Smith " * 800, "filename": "Smith.csv", "checks": checks, "state": "in_review"}
    )
    shown = json.dumps(info)
    for leak in ("HIV_positive", "3.0", "Smith", "age=87", "Kestrel", "0.123", "1.2345", "4242", "xxxx"):
        assert leak not in shown, leak
    by = {c["check"]: c for c in info["checks"]}
    assert by["minimum_count"] == {
        "check": "minimum_count",
        "status": "fail",
        "reason": "every count is at least the project's minimum: failed; airlock.status(id) in your notebook says why",
        "details": {},
    }
    assert by["row_level"]["reason"] == "the table is not row-level data of the project's datasets: passed"
    assert by["internal"]["status"] == "error"  # an unknown check is named by none of its own words
    assert info["justification"].startswith("(about 4800 characters;") and info["filename"] == views.UNNAMED
    assert info["state"] == "in_review"
    # Released, the name is the released file's, which the steward approved.
    released = views.requester_info({"justification": "j", "filename": "t.csv", "checks": [], "state": "released"})
    assert released["filename"] == "t.csv"
    # What airlock.check hands the kernel to display keeps the capped reason and the numbers.
    notebook = {c["check"]: views.notebook_check(c) for c in checks}
    assert notebook["minimum_count"]["details"] == {"threshold": 10, "cells_count": 1}
    assert notebook["readable"]["reason"].startswith("the file could not be read as a table")
    assert len(notebook["row_level"]["reason"]) == views.SHOWN_REASON


def test_a_requesters_browser_gets_sizes_to_two_digits_and_times_to_the_minute():
    assert [views.rounded_size(n) for n in (0, 99, 100, 12_345, 987_654_321)] == [0, 99, 100, 12_000, 990_000_000]
    assert views.minute(1_700_000_059.999) == 1_700_000_040.0 and views.minute(1_700_000_100.0) == 1_700_000_100.0
    pending = {
        "id": "r",
        "state": "in_review",
        "filename": "cohort_Zq7.csv",
        "sha256": "ab" * 32,
        "size": 123_456,
        "justification": "j" * 1234,
        "created": 1_700_000_059.25,
        "updated": 1_700_000_123.5,
        "decisions": [{"by": "sam", "ts": 1_700_000_170.125, "action": "return"}],
    }
    shown = views.shown_request(pending)
    assert shown == {
        **pending,
        "filename": views.UNNAMED,
        "sha256": views.UNHASHED,
        "size": 120_000,
        "justification": "(about 1200 characters; the reviewers read all of it, and your notebook has it)",
        "created": 1_700_000_040.0,
        "updated": 1_700_000_100.0,
        "decisions": [{"by": "sam", "ts": 1_700_000_160.0, "action": "return"}],
    }
    # Released, the file left as it is: its name, hash and size are shown whole; the times stay rounded.
    released = views.shown_request({**pending, "state": "released"})
    assert (released["filename"], released["sha256"], released["size"]) == ("cohort_Zq7.csv", "ab" * 32, 123_456)
    assert released["created"] == 1_700_000_040.0


def test_a_table_preview_is_read_page_by_page():
    from paitient.services.airlock.canonical import PREVIEW_COLUMNS, PREVIEW_ROWS, Page, pages_of

    assert (PREVIEW_ROWS, PREVIEW_COLUMNS) == (200, 30)
    assert pages_of(0, 0) == (Page(),) and pages_of(200, 30) == (Page(),)
    assert pages_of(201, 31) == (Page(0, 0), Page(200, 0), Page(0, 30), Page(200, 30))
    frame = pd.DataFrame({f"c{j}": [i * 100 + j for i in range(250)] for j in range(32)})
    upload = frame.to_csv(index=False).encode()
    first = canonical_for("table", "t.csv", upload)
    assert first.table is not None and first.table.page == Page() and len(first.table.pages) == 4
    assert first.table.rows[0][:2] == ("0", "1") and len(first.table.rows) == 200 and len(first.table.columns) == 30
    corner = canonical_for("table", "t.csv", upload, Page(200, 30))
    assert corner.table is not None and corner.table.columns == ("c30", "c31")
    assert corner.table.rows[0] == ("20030", "20031") and len(corner.table.rows) == 50
    assert json.loads(corner.data)["first_row"] == 200 and corner.sha256 != first.sha256
    assert Page(200, 30).describe(250, 32) == "rows 201-250, columns 31-32"
    with pytest.raises(NoPreview, match="there is no page at row 401, column 1"):
        canonical_for("table", "t.csv", upload, Page(400, 0))
    with pytest.raises(NoPreview, match="there is no page at row 11"):
        canonical_for("table", "t.csv", upload, Page(10, 0))
    with pytest.raises(NoPreview, match="only a table's preview has pages"):
        canonical_for("other", "notes.txt", b"plain words", Page(200, 0))


def test_a_cell_longer_than_a_preview_shows_is_refused_at_the_request():
    from paitient.services.airlock.canonical import PREVIEW_CELL_CHARS, Refused, canonical_output

    long = "x" * (PREVIEW_CELL_CHARS + 1)
    for kind, name in (("table", "t.csv"), ("other", "t.csv")):
        with pytest.raises(Refused, match=r"^1 column name\(s\) or text cell\(s\) of the table have more than 200"):
            canonical_output(kind, name, f"stage,note\nI,{long}\n".encode())
        with pytest.raises(Refused, match="release long text as a text file"):
            canonical_output(kind, name, f"stage,{long}\nI,1\n".encode())
    fits = canonical_output("other", "t.csv", f"stage,note\nI,{'x' * PREVIEW_CELL_CHARS}\n".encode())
    assert fits.data.endswith(b"x" * PREVIEW_CELL_CHARS + b"\n")
    # As text, it is read whole.
    assert canonical_output("other", "notes.txt", long.encode()).data == long.encode()


def test_what_a_page_does_not_show_of_a_cell_or_a_text_does_not_leave():
    """Invisible code points, whitespace a table cell does not show as it is, and a formula's quote pushing a
    cell past what a preview shows: each would carry characters the steward never saw."""
    from paitient.services.airlock.canonical import PREVIEW_CELL_CHARS, Refused, canonical_output

    hidden = "\ufe0f\ufe0e\u034f" * 10 + "".join(map(chr, range(0xE0100, 0xE0164))) + "\u3164\u2800"
    out = canonical_output("table", "t.csv", f"stage,note\nI,x{hidden}\u00a0y\u2009z\n".encode())
    assert out.data == b"stage,note\nI,x y z\n"
    spaced = canonical_output("other", "t.csv", b'stage,note\nI,"  x \t\t y\n\n z  "\n')
    assert spaced.data == b"stage,note\nI,x y z\n"
    named = canonical_output("table", "t.csv", b'" stage\t ",n\nI,1\n')
    assert named.data == b"stage,n\nI,1\n"
    text = canonical_output("other", "notes.txt", b"a\tb   \nc \t\n\n\n")
    assert text.data == b"a b\nc\n"  # the tab's spaces between two words are one space, as a reader sees them
    # A formula's quote counts: a 200-character cell starting with '=' is stored with 201.
    formula = "=" + "A" * (PREVIEW_CELL_CHARS - 2) + "Z"
    with pytest.raises(Refused, match="1 column name\\(s\\) or text cell\\(s\\) of the table have more than 200"):
        canonical_output("table", "t.csv", f"stage,note\nI,{formula}\n".encode())
    assert canonical_output("table", "t.csv", f"stage,note\nI,{formula}\n".encode(), table_format="xlsx").data


def test_an_xlsx_types_each_column_as_the_preview_does():
    """Text digits and text booleans read back from the CSV as numbers and booleans, so the preview types
    them so: the XLSX writes them so too, not as text cells a steward never saw typed as text. Dates with a
    time zone are written as the text the preview shows, not moved to UTC; dates without one stay dates."""
    import datetime

    import openpyxl

    frame = pd.DataFrame(
        {
            "code": ["123", "0456", "789"],
            "flag": ["True", "False", "True"],
            "at": pd.to_datetime(["2024-01-01 10:00", "2024-02-01 11:30", "2024-03-01 12:00"]).tz_localize(
                "Europe/Berlin"
            ),
            "day": pd.to_datetime(["2024-01-01", "2024-02-01", "2024-03-01"]),
            "stage": ["I", "II", "III"],
        }
    )
    buf = io.BytesIO()
    frame.to_parquet(buf)
    out = canonical.canonical_output("table", "t.parquet", buf.getvalue(), table_format="xlsx")
    preview = canonical_for("table", "t.csv", out.cells).table
    assert preview is not None
    assert preview.types[:2] == ("integer", "boolean") and preview.types[4] == "text"
    assert preview.rows[0][:3] == ("123", "true", "2024-01-01 10:00:00+01:00")
    sheet = openpyxl.load_workbook(io.BytesIO(out.data)).active
    first = [(c.value, c.data_type) for c in sheet[2]]
    assert first == [
        (123, "n"),
        (True, "b"),
        ("2024-01-01 10:00:00+01:00", "s"),
        (datetime.datetime(2024, 1, 1), "d"),
        ("I", "s"),
    ]
    assert [c.value for c in sheet["A"]][1:] == [123, 456, 789]
