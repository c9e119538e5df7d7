"""The canonical XLSX: one sheet written from a table's typed cells. Pure.

The workbook is written part by part, not through a spreadsheet library's object model (which builds one
object per cell and took most of the time of a 10 MB table's release). It holds what a spreadsheet needs and
nothing else: ``[Content_Types].xml``, ``_rels/.rels``, ``xl/workbook.xml`` and its relationships, the
styles (two date formats), ``xl/sharedStrings.xml`` and ``xl/worksheets/sheet1.xml``; no document properties,
no theme, and every zip entry dated :data:`ZIP_DATE`, so the same cells always give the same bytes.

Cells by type:

- text: a shared string (``t="s"``), never a formula, whatever it starts with. The strings are numbered in
  the order they first occur, column by column, header first;
- integers and finite floats: numbers, floats written with ``repr`` (the shortest text that reads back as the
  same float); infinities and NaN have no number in a sheet and leave the cell empty, as missing values do;
- booleans: ``t="b"``;
- dates and times: the spreadsheet's serial day number (days since 1899-12-30, the 1900 leap-year bug kept,
  as spreadsheets count) in a date format; a time zone is converted to UTC first. Spreadsheet readers round
  the serial number to the millisecond.

Excel shows a text cell's ``_xHHHH_`` as the character it encodes; the text is written as it is (openpyxl and
the preview read it literally).
"""

from __future__ import annotations

import datetime
import decimal
import io
import math
import re
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd

ZIP_DATE = (1980, 1, 1, 0, 0, 0)
"""The time stamp of every entry (the zip format's earliest)."""
COMPRESS_LEVEL = 1
"""Deflate level of the entries: the sheet is repetitive markup, and level 1 compresses it to within a quarter
of level 6's size at three times the speed."""
MAX_ROWS = 1_048_576
"""Rows a sheet holds (the header included), as spreadsheets define it."""
MAX_COLUMNS = 16_384
"""Columns a sheet holds."""
SHEET = "table"

MAIN = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
REL = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
PKG_REL = "http://schemas.openxmlformats.org/package/2006/relationships"
XML = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
SML = "application/vnd.openxmlformats-officedocument.spreadsheetml"

CONTENT_TYPES = (
    XML + '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    '<Default Extension="xml" ContentType="application/xml"/>'
    f'<Override PartName="/xl/workbook.xml" ContentType="{SML}.sheet.main+xml"/>'
    f'<Override PartName="/xl/worksheets/sheet1.xml" ContentType="{SML}.worksheet+xml"/>'
    f'<Override PartName="/xl/styles.xml" ContentType="{SML}.styles+xml"/>'
    f'<Override PartName="/xl/sharedStrings.xml" ContentType="{SML}.sharedStrings+xml"/>'
    "</Types>"
)
ROOT_RELS = (
    XML + f'<Relationships xmlns="{PKG_REL}">'
    f'<Relationship Id="rId1" Type="{REL}/officeDocument" Target="xl/workbook.xml"/>'
    "</Relationships>"
)
WORKBOOK = (
    XML + f'<workbook xmlns="{MAIN}" xmlns:r="{REL}">'
    f'<sheets><sheet name="{SHEET}" sheetId="1" r:id="rId1"/></sheets>'
    "</workbook>"
)
WORKBOOK_RELS = (
    XML + f'<Relationships xmlns="{PKG_REL}">'
    f'<Relationship Id="rId1" Type="{REL}/worksheet" Target="worksheets/sheet1.xml"/>'
    f'<Relationship Id="rId2" Type="{REL}/styles" Target="styles.xml"/>'
    f'<Relationship Id="rId3" Type="{REL}/sharedStrings" Target="sharedStrings.xml"/>'
    "</Relationships>"
)
DATETIME_STYLE = 1
"""The cell style (``s``) of a date and time: ``yyyy-mm-dd hh:mm:ss``."""
DATE_STYLE = 2
"""The cell style of a date without a time: ``yyyy-mm-dd``."""
STYLES = (
    XML + f'<styleSheet xmlns="{MAIN}">'
    '<numFmts count="2"><numFmt numFmtId="164" formatCode="yyyy-mm-dd hh:mm:ss"/>'
    '<numFmt numFmtId="165" formatCode="yyyy-mm-dd"/></numFmts>'
    '<fonts count="1"><font><sz val="11"/><name val="Calibri"/><family val="2"/></font></fonts>'
    '<fills count="2"><fill><patternFill patternType="none"/></fill><fill><patternFill patternType="gray125"/></fill>'
    "</fills>"
    '<borders count="1"><border><left/><right/><top/><bottom/><diagonal/></border></borders>'
    '<cellStyleXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0"/></cellStyleXfs>'
    '<cellXfs count="3"><xf numFmtId="0" fontId="0" fillId="0" borderId="0" xfId="0"/>'
    '<xf numFmtId="164" fontId="0" fillId="0" borderId="0" xfId="0" applyNumberFormat="1"/>'
    '<xf numFmtId="165" fontId="0" fillId="0" borderId="0" xfId="0" applyNumberFormat="1"/></cellXfs>'
    '<cellStyles count="1"><cellStyle name="Normal" xfId="0" builtinId="0"/></cellStyles>'
    "</styleSheet>"
)

EPOCH = datetime.datetime(1899, 12, 30)
_EPOCH_NS = np.datetime64("1899-12-30T00:00:00", "ns").astype(np.int64)
_DAY_NS = 86_400 * 10**9
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
"""Characters no XML document may hold."""
_ROWS_PER_CHUNK = 4096


class SheetTooLarge(ValueError):
    """The table has more rows or columns than a sheet holds."""


def column_letter(index: int) -> str:
    """The letters of the 0-based column ``index``: 0 is A, 25 is Z, 26 is AA."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(65 + rest) + letters
    return letters


def serial(value: datetime.datetime | datetime.date) -> float:
    """A date's serial day number as spreadsheets count it (1900-01-01 is day 1; 1900-02-29, which did not
    exist, is day 60)."""
    if not isinstance(value, datetime.datetime):
        value = datetime.datetime.combine(value, datetime.time())
    if value.tzinfo is not None:
        value = value.astimezone(datetime.UTC).replace(tzinfo=None)
    delta = value - EPOCH
    days = delta.days - (1 if 0 < delta.days <= 60 else 0)
    return days + (delta.seconds + delta.microseconds / 1e6) / 86400


def _escape(text: str, where: str) -> str:
    if _NOT_XML.search(text):
        raise ValueError(f"{where} holds a character no XML document may hold; normalise the text first")
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class _Strings:
    """The shared strings, numbered in the order they first occur."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.count = 0

    def xml(self) -> bytes:
        items = "".join(f'<si><t xml:space="preserve">{_escape(s, "a text cell")}</t></si>' for s in self.index)
        head = f'{XML}<sst xmlns="{MAIN}" count="{self.count}" uniqueCount="{len(self.index)}">'
        return (head + items + "</sst>").encode("utf-8")


def _value(ref: str, value: Any) -> str:
    """One cell that is not text; "" for an empty one."""
    if value is None or value is pd.NA or value is pd.NaT:
        return ""
    if isinstance(value, bool | np.bool_):
        return f'<c r="{ref}" t="b"><v>{int(value)}</v></c>'
    if isinstance(value, int | np.integer):
        return f'<c r="{ref}"><v>{int(value)}</v></c>'
    if isinstance(value, float | np.floating):
        return f'<c r="{ref}"><v>{float(value)!r}</v></c>' if math.isfinite(value) else ""
    if isinstance(value, decimal.Decimal):
        return f'<c r="{ref}"><v>{value}</v></c>' if value.is_finite() else ""
    if isinstance(value, datetime.datetime | datetime.date):
        style = DATETIME_STYLE if isinstance(value, datetime.datetime) else DATE_STYLE
        return f'<c r="{ref}" s="{style}"><v>{serial(value)!r}</v></c>'
    raise ValueError(f"a cell holds a {type(value).__name__}, which a sheet cannot hold")


def _mixed(letter: str, rows: list[str], values: list[Any], strings: _Strings) -> list[str]:
    """The cells of Python values of any type: text as shared strings (numbered already), the rest by type."""
    index = strings.index
    return [
        _value(letter + r, v) if not isinstance(v, str) else f'<c r="{letter}{r}" t="s"><v>{index[v]}</v></c>' * bool(v)
        for r, v in zip(rows, values, strict=True)
    ]


def _serials(s: pd.Series) -> np.ndarray:
    """A datetime64 column's serial numbers, computed as :func:`serial` computes them; NaN where missing."""
    if s.dt.tz is not None:
        s = s.dt.tz_convert("UTC").dt.tz_localize(None)
    ns = s.to_numpy(dtype="datetime64[ns]")
    delta = ns.view(np.int64) - _EPOCH_NS
    days = delta // _DAY_NS
    rest = delta - days * _DAY_NS
    seconds, micros = rest // 10**9, (rest % 10**9) // 1000
    days -= (days > 0) & (days <= 60)
    out = days + (seconds + micros / 1e6) / 86400
    out[np.isnat(ns)] = np.nan
    return out


class _Column:
    """One column, ready to be written a chunk of rows at a time: NumPy numbers, booleans and dates as they
    are, text as the numbers of its shared strings (numbered here, column by column), anything else as values."""

    def __init__(self, s: pd.Series, strings: _Strings):
        dtype = s.dtype
        numpy = isinstance(dtype, np.dtype)
        if numpy and dtype.kind == "f" and dtype.itemsize < 8:  # 0.1 as float32 is 0.1, as the CSV writes it
            self.kind, self.values = "f", np.array([float(str(v)) for v in s.to_numpy()], dtype=np.float64)
            return
        if numpy and dtype.kind in "iufb":
            self.kind, self.values = dtype.kind.replace("u", "i"), s.to_numpy()
            return
        if pd.api.types.is_datetime64_any_dtype(dtype):
            self.kind, self.values = "date", _serials(s)
            return
        values = s.to_numpy(dtype=object)
        codes, uniques = pd.factorize(values)
        index = strings.index
        if all(isinstance(u, str) for u in uniques):
            # Empty text is written as no cell, as the CSV the checks read has it (nothing), never as a "".
            numbers = np.array([index.setdefault(u, len(index)) if u else -1 for u in uniques] + [-1], dtype=np.int64)
            self.kind, self.values = "text", numbers[codes]
            strings.count += int((self.values >= 0).sum())
            return
        for v in values:
            if isinstance(v, str) and v:
                index.setdefault(v, len(index))
                strings.count += 1
        self.kind, self.values = "mixed", values

    def cells(self, letter: str, rows: list[str], start: int, strings: _Strings) -> list[str]:
        values = self.values[start : start + len(rows)].tolist()
        pairs = zip(rows, values, strict=True)
        if self.kind == "i":
            return [f'<c r="{letter}{r}"><v>{v}</v></c>' for r, v in pairs]
        if self.kind == "f":  # NaN and infinities have no number in a sheet: the cell stays empty
            return [f'<c r="{letter}{r}"><v>{v!r}</v></c>' if v - v == 0 else "" for r, v in pairs]
        if self.kind == "text":
            return [f'<c r="{letter}{r}" t="s"><v>{v}</v></c>' if v >= 0 else "" for r, v in pairs]
        if self.kind == "b":
            return [f'<c r="{letter}{r}" t="b"><v>{int(v)}</v></c>' for r, v in pairs]
        if self.kind == "date":
            return [f'<c r="{letter}{r}" s="{DATETIME_STYLE}"><v>{v!r}</v></c>' if v == v else "" for r, v in pairs]
        return _mixed(letter, rows, values, strings)


def _sheet_rows(frame: pd.DataFrame, letters: list[str], strings: _Strings) -> Iterator[bytes]:
    """The sheet's ``<row>`` elements, the header first, a chunk of rows at a time."""
    names = [str(c) for c in frame.columns]
    for name in filter(None, names):
        strings.index.setdefault(name, len(strings.index))
        strings.count += 1
    columns = [_Column(frame.iloc[:, j], strings) for j in range(len(letters))]
    header = _mixed("", [f"{letter}1" for letter in letters], names, strings)  # A1, B1, ...
    yield ('<row r="1">' + "".join(header) + "</row>").encode("utf-8")
    for start in range(0, len(frame), _ROWS_PER_CHUNK):
        rows = [str(i) for i in range(start + 2, min(start + _ROWS_PER_CHUNK, len(frame)) + 2)]
        cells = [c.cells(letter, rows, start, strings) for c, letter in zip(columns, letters, strict=True)]
        yield "".join([f'<row r="{r}">{"".join(row)}</row>' for r, *row in zip(rows, *cells, strict=True)]).encode(
            "utf-8"
        )


def _entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info._compresslevel = COMPRESS_LEVEL  # type: ignore[attr-defined]  # what ZipFile.open(str) sets itself
    return info


def write(frame: pd.DataFrame) -> bytes:
    """The workbook of ``frame``'s cells (its column names as the header row); raises :class:`SheetTooLarge`
    when a sheet cannot hold them, and ValueError for a value no cell holds (bytes, nested values) or text
    with characters XML forbids (:func:`paitient.services.airlock.canonical.canonical_frame` leaves neither)."""
    n_rows, n_columns = frame.shape
    if n_rows + 1 > MAX_ROWS or n_columns > MAX_COLUMNS:
        raise SheetTooLarge(
            f"the table has {n_rows} rows and {n_columns} columns; a spreadsheet holds at most {MAX_ROWS - 1} rows "
            f"under its header and {MAX_COLUMNS} columns"
        )
    letters = [column_letter(j) for j in range(n_columns)]
    last = f"{letters[-1]}{n_rows + 1}" if letters else "A1"
    strings = _Strings()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, body in (
            ("[Content_Types].xml", CONTENT_TYPES),
            ("_rels/.rels", ROOT_RELS),
            ("xl/workbook.xml", WORKBOOK),
            ("xl/_rels/workbook.xml.rels", WORKBOOK_RELS),
            ("xl/styles.xml", STYLES),
        ):
            z.writestr(_entry(name), body.encode("utf-8"))
        with z.open(_entry("xl/worksheets/sheet1.xml"), "w") as sheet:
            sheet.write(f'{XML}<worksheet xmlns="{MAIN}"><dimension ref="A1:{last}"/><sheetData>'.encode())
            for chunk in _sheet_rows(frame, letters, strings):
                sheet.write(chunk)
            sheet.write(b"</sheetData></worksheet>")
        z.writestr(_entry("xl/sharedStrings.xml"), strings.xml())
    return out.getvalue()
