"""The canonical XLSX writer: every cell reads back (openpyxl, pandas) with its value and type, text stays text
whatever it starts with, the same cells give the same bytes, and the workbook holds nothing but the sheet."""

from __future__ import annotations

import datetime
import decimal
import io
import math
import zipfile
from xml.etree import ElementTree

import numpy as np
import pandas as pd
import pytest
from openpyxl import load_workbook

from paitient.services.airlock import xlsx
from paitient.services.airlock.canonical import Refused, canonical_output, xlsx_frame

TEXT = [
    '=HYPERLINK("http://x/?"&A2,"click")',
    "+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(A1:A9)",
    "\t=1+1",
    " padded ",
    "a <b> & c",
    "two\nlines",
    "Zürich ✓",
    "_x0041_",
    None,
]
"""Text cells a spreadsheet could take for something else: formulas, markup, white space, escapes."""
RELEASED = [None if t is None else " ".join(t.split()) for t in TEXT]
"""The same cells as released: no whitespace around a cell's text, a run of it one space (as a page shows)."""


def typed_table() -> pd.DataFrame:
    n = len(TEXT)
    return pd.DataFrame(
        {
            "text": TEXT,
            "count": [-2, 0, 3, 2**40, -(2**31), 7, 8, 9, 10, 11, 12],
            "share": [
                0.39147771174750684,
                -0.5,
                1e-300,
                -1.7976931348623157e308,
                2.5,
                math.nan,
                1 / 3,
                0.1,
                7.0,
                -0.0,
                1e16,
            ],
            "alive": [True, False] * 5 + [True],
            "when": pd.to_datetime(["2020-01-01T00:00:00", "2021-06-30T12:34:56.789"] * 5 + [None], format="ISO8601"),
            "utc": pd.to_datetime(["2020-01-01T12:00:00+02:00"] * n),
            "day": [datetime.date(2020, 1, 2), None] * 5 + [datetime.date(1900, 1, 1)],
            "exact": [decimal.Decimal("1.10"), None] * 5 + [decimal.Decimal("-3")],
        }
    )


def parquet(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def released(df: pd.DataFrame) -> bytes:
    out = canonical_output("table", "t.parquet", parquet(df), table_format="xlsx")
    assert out.form == "xlsx" and out.filename == "t.xlsx"
    return out.data


def test_every_cell_reads_back_with_its_value_and_type():
    df = typed_table()
    data = released(df)
    ws = load_workbook(io.BytesIO(data)).active
    rows = list(ws.iter_rows())
    assert ws.title == "table" and len(rows) == len(df) + 1
    assert [(c.value, c.data_type) for c in rows[0]] == [(name, "s") for name in df.columns]
    for i, row in enumerate(rows[1:]):
        got = {name: cell for name, cell in zip(df.columns, row, strict=True)}
        text = RELEASED[i]
        if text is None:
            assert got["text"].value is None
        else:  # text is text, whatever it starts with: no formula, no quote added
            assert (got["text"].value, got["text"].data_type) == (text, "s")
        count = got["count"]
        assert count.value == df["count"][i] and type(count.value) is int and count.data_type == "n"
        share = df["share"][i]
        if math.isnan(share):
            assert got["share"].value is None
        else:  # floats exactly, to the last bit
            assert got["share"].value == share and math.copysign(1, got["share"].value) == math.copysign(1, share)
        assert got["alive"].value is bool(df["alive"][i]) and got["alive"].data_type == "b"
        when = df["when"][i]
        if pd.isna(when):
            assert got["when"].value is None
        else:  # dates as dates, to the millisecond a spreadsheet's day number holds
            assert got["when"].data_type == "d" and got["when"].value == when.to_pydatetime()
        # A sheet holds no time zone: the text the preview shows, not the time moved to UTC.
        assert (got["utc"].value, got["utc"].data_type) == ("2020-01-01 12:00:00+02:00", "s")
        day = df["day"][i]
        assert got["day"].value == (None if day is None else datetime.datetime.combine(day, datetime.time()))
        exact = df["exact"][i]
        assert got["exact"].value == (None if exact is None else float(exact))


def test_pandas_reads_the_same_frame_back():
    df = typed_table()[["text", "count", "share", "alive", "when"]]
    back = xlsx_frame(released(df))
    expected = df.assign(text=pd.Series(RELEASED, dtype=object).replace({None: np.nan}))
    pd.testing.assert_frame_equal(back, expected, check_dtype=True)


def test_text_cells_are_shared_strings_and_no_cell_is_a_formula():
    data = released(typed_table())
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        sheet = ElementTree.fromstring(z.read("xl/worksheets/sheet1.xml"))  # noqa: S314 (the airlock's own output)
        strings = ElementTree.fromstring(z.read("xl/sharedStrings.xml"))  # noqa: S314
    ns = {"m": xlsx.MAIN}
    assert sheet.findall(".//m:f", ns) == []
    texts = [si.find("m:t", ns).text for si in strings.findall("m:si", ns)]
    column_a = [c for c in sheet.findall(".//m:c", ns) if c.get("r").startswith("A") and c.get("r") != "A1"]
    assert [c.get("t") for c in column_a] == ["s"] * (len(TEXT) - 1)
    assert [texts[int(c.find("m:v", ns).text)] for c in column_a] == [t for t in RELEASED if t is not None]


def test_the_same_cells_give_the_same_bytes_and_nothing_but_the_sheet():
    df = typed_table()
    first, again = released(df), released(df.copy())
    assert first == again
    with zipfile.ZipFile(io.BytesIO(first)) as z:
        assert z.namelist() == [
            "[Content_Types].xml",
            "_rels/.rels",
            "xl/workbook.xml",
            "xl/_rels/workbook.xml.rels",
            "xl/styles.xml",
            "xl/worksheets/sheet1.xml",
            "xl/sharedStrings.xml",
        ]
        assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_DEFLATED}
        for name in z.namelist():
            ElementTree.fromstring(z.read(name))  # noqa: S314 (each part is well-formed XML)
    # Other cells, other bytes.
    assert released(df.assign(count=df["count"] + 1)) != first


def test_a_table_larger_than_a_sheet_is_refused_saying_release_it_as_csv(monkeypatch):
    monkeypatch.setattr(xlsx, "MAX_ROWS", 3)
    with pytest.raises(Refused, match=r"a spreadsheet holds at most 2 rows .* release it as CSV"):
        released(pd.DataFrame({"n": [1, 2, 3]}))
    assert xlsx_frame(released(pd.DataFrame({"n": [1, 2]})))["n"].tolist() == [1, 2]


def test_a_long_table_is_written_across_chunks_in_order():
    n = 3 * 4096 + 5
    df = pd.DataFrame({"row": np.arange(n), "label": [f"g{i % 7}" for i in range(n)]})
    back = xlsx_frame(released(df))
    pd.testing.assert_frame_equal(back, df)


def test_column_letters_and_day_numbers():
    assert [xlsx.column_letter(i) for i in (0, 25, 26, 701, 702, 16383)] == ["A", "Z", "AA", "ZZ", "AAA", "XFD"]
    # Spreadsheets count 1900-01-01 as day 1 and keep the 1900-02-29 that never was as day 60.
    assert xlsx.serial(datetime.date(1900, 1, 1)) == 1
    assert xlsx.serial(datetime.date(1900, 2, 28)) == 59
    assert xlsx.serial(datetime.date(1900, 3, 1)) == 61
    assert xlsx.serial(datetime.datetime(2020, 1, 1, 18)) == 43831.75
    # The vectorised day numbers of a datetime64 column are the same numbers.
    stamps = pd.Series(
        pd.to_datetime(["1900-01-01", "1900-02-28 06:00", "1900-03-01", "2021-06-30 12:34:56.789"], format="ISO8601")
    )
    assert xlsx._serials(stamps).tolist() == [xlsx.serial(t.to_pydatetime()) for t in stamps]


def test_single_precision_numbers_are_written_as_the_csv_writes_them():
    df = pd.DataFrame({"share": np.array([0.1, 2.5, np.nan], dtype=np.float32)})
    out = canonical_output("table", "t.parquet", parquet(df))
    assert out.data == b'share\n0.1\n2.5\n""\n'
    ws = load_workbook(io.BytesIO(released(df))).active
    assert [ws.cell(row=r, column=1).value for r in (2, 3, 4)] == [0.1, 2.5, None]
