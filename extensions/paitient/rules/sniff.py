"""What a file is, decided by its bytes, not its name: what the browser may open, and what never leaves.

The contents API sends the browser what an editor needs (notebooks, source and plain text, images) and
never a data file, whatever it is called: a CSV renamed ``notes.py`` is still a table. :func:`sniff` reads
the leading bytes for the magic numbers of binary formats, decodes text, and looks at the shape of the
lines for delimited tables and record-per-line data. A file with an image's magic number is an image only
when it is one to its last byte (:mod:`paitient.rules.imagecheck`); else it is data. Pure: it is given
bytes and says what they are.
"""

from __future__ import annotations

import enum
import json
import pickletools
import struct
from collections import Counter
from dataclasses import dataclass

from paitient.rules.imagecheck import NotAnImage, carried


class Kind(enum.Enum):
    NOTEBOOK = "notebook"
    TEXT = "text"
    IMAGE = "image"
    DATA = "data"
    """A data format: never served."""
    BINARY = "binary"
    """Bytes that are neither text nor a known image: never served."""


@dataclass(frozen=True)
class Sniffed:
    kind: Kind
    what: str
    """For a person: ``a Parquet file``, ``delimited text (a table)``, ``text``, ..."""
    mimetype: str = ""
    carried: bytes = b""
    """For an image: what it carries besides its pixels (text, profiles, metadata), to be read for rows."""

    @property
    def served(self) -> bool:
        return self.kind in (Kind.NOTEBOOK, Kind.TEXT, Kind.IMAGE)


# (offset, magic, description): data formats and archives, by their leading bytes.
MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"PAR1", "a Parquet file"),
    (0, b"ARROW1", "an Arrow IPC file"),
    (0, b"FEA1", "a Feather file"),
    (0, b"\xff\xff\xff\xff", "an Arrow IPC stream"),
    (0, b"ORC", "an ORC file"),
    (0, b"Obj\x01", "an Avro file"),
    (0, b"\x93NUMPY", "a NumPy array"),
    (0, b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
    (512, b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
    (0, b"CDF\x01", "a netCDF file"),
    (0, b"CDF\x02", "a netCDF file"),
    (0, b"SQLite format 3\x00", "an SQLite database"),
    (0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an Office document (a spreadsheet?)"),
    (0, b"PK\x03\x04", "a zip archive (spreadsheets, NumPy .npz and PyTorch files are zip archives too)"),
    (0, b"PK\x05\x06", "a zip archive"),
    (0, b"PK\x07\x08", "a zip archive"),
    (0, b"\x1f\x8b", "a gzip archive"),
    (0, b"BZh", "a bzip2 archive"),
    (0, b"\xfd7zXZ\x00", "an xz archive"),
    (0, b"7z\xbc\xaf\x27\x1c", "a 7-zip archive"),
    (0, b"\x28\xb5\x2f\xfd", "a zstd archive"),
    (0, b"\x04\x22\x4d\x18", "an lz4 archive"),
    (0, b"Rar!\x1a\x07", "a rar archive"),
    (257, b"ustar", "a tar archive"),
    (0, b"$FL2", "an SPSS data file"),
    (0, b"$FL3", "an SPSS data file"),
    (0, b"<stata_dta>", "a Stata data file"),
    (0, b"RDX2\n", "an R data file"),
    (0, b"RDX3\n", "an R data file"),
    (0, b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\xc2\xea\x81\x60\xb3\x14\x11\xcf", "a SAS data file"),
)

IMAGES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)

TABLE_DELIMITERS = (",", "\t", ";", "|")
MIN_TABLE_LINES = 4
"""Fewer lines than this are not judged a table (a header and a couple of rows say little)."""
TABLE_SHARE = 0.8
"""A table: this share of its lines split into the same number (>= 3) of fields on one delimiter."""
SAMPLE_LINES = 400
PICKLE_PROBE = 1 << 20
"""Bytes parsed to recognise a pickle (text fails on its first bytes; a pickle ends with STOP)."""


def _is_pickle(data: bytes) -> bool:
    """True if ``data`` parses as a pickle up to its STOP opcode (parsing only: nothing is executed)."""
    if not data:
        return False
    try:
        last = None
        for opcode, _arg, _pos in pickletools.genops(data[:PICKLE_PROBE]):
            last = opcode.name
        return last == "STOP"
    except Exception:
        return False


def _is_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    (n,) = struct.unpack("<Q", data[:8])
    return 2 <= n <= len(data) - 8 and data[8:9] == b"{"


def _table_shape(text: str) -> str | None:
    """``delimited text (a table)``, ``JSON records, one per line`` or None."""
    lines = [ln for ln in text.splitlines()[:SAMPLE_LINES] if ln.strip()]
    if len(lines) < MIN_TABLE_LINES:
        return None
    for delim in TABLE_DELIMITERS:
        counts = Counter(ln.count(delim) for ln in lines)
        fields, n = counts.most_common(1)[0]
        if fields >= 2 and n >= TABLE_SHARE * len(lines):
            return "delimited text (a table)"
    records = 0
    for ln in lines:
        s = ln.strip()
        if s.startswith("{") and s.endswith("}"):
            try:
                records += isinstance(json.loads(s), dict)
            except ValueError:
                pass
    if records >= TABLE_SHARE * len(lines):
        return "JSON records, one per line (a table)"
    return None


def _is_notebook(text: str) -> bool:
    head = text.lstrip()[:1]
    if head != "{":
        return False
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    return isinstance(doc, dict) and "cells" in doc and "nbformat" in doc


def sniff(data: bytes) -> Sniffed:
    """What ``data`` is. Data formats and unknown binary are never served; text is, unless it is a table."""
    for offset, magic, what in MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return Sniffed(Kind.DATA, what)
    for magic, mimetype in IMAGES:
        if data.startswith(magic):
            # eight bytes in front of a table do not make it a picture: an image is served only when it is
            # that image to its last byte
            try:
                return Sniffed(Kind.IMAGE, "an image", mimetype, carried(data, mimetype))
            except NotAnImage:
                return Sniffed(Kind.DATA, "a file that starts like an image but is not one")
    if _is_safetensors(data):
        return Sniffed(Kind.DATA, "a safetensors file (model weights)")
    if _is_pickle(data):
        return Sniffed(Kind.DATA, "a Python pickle")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return Sniffed(Kind.BINARY, "a binary file")
    if "\x00" in text:
        return Sniffed(Kind.BINARY, "a binary file")
    if _is_notebook(text):
        return Sniffed(Kind.NOTEBOOK, "a notebook", "application/x-ipynb+json")
    shape = _table_shape(text)
    if shape is not None:
        return Sniffed(Kind.DATA, shape)
    return Sniffed(Kind.TEXT, "text", "text/plain")
