"""The canonical form of an upload: what the review pages show instead of the uploaded bytes. Pure.

A reviewer's browser is outside the workspace, so a preview is rendered from a re-encoding, never from the
upload itself:

- ``image`` (figures, and other files that start like an image): the first frame's pixels re-encoded as a
  PNG without metadata (:mod:`paitient.services.airlock.images`);
- ``table`` (tables; other files named ``.csv``/``.tsv``/``.tab``/``.parquet`` or in Parquet): the file
  parsed into typed columns, the first rows and columns rendered cell by cell from those values;
- ``text`` (other files): decoded as UTF-8, normalised (NFC, ``\\n`` line ends, no control characters).

Anything that does not parse into one of these has no preview, and :class:`NoPreview` says why: a table
behind a PNG header is not an image and not UTF-8. :attr:`Canonical.data` holds exactly what a preview
shows (the PNG, the rendered cells as JSON, the normalised text); the audit trail records its SHA-256.
"""

from __future__ import annotations

import decimal
import hashlib
import io
import json
import math
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from paitient.rules.disclosure import TableError, read_table
from paitient.services.airlock.images import ImageRefused, reencode

PREVIEW_MAX_SOURCE_BYTES = 64 << 20
"""Largest upload parsed for a preview; a larger one is reviewed from its checks (and in the workspace)."""
PREVIEW_MAX_PIXELS = 40_000_000
"""Most pixels an image preview decodes (checked before decoding: a decompression bomb is refused)."""
PREVIEW_MAX_IMAGE_BYTES = 32 << 20
"""Largest re-encoded PNG a preview serves."""
PREVIEW_MAX_CELLS = 20_000_000
"""Most cells (rows x columns, from the Parquet footer) a table preview parses."""
PREVIEW_ROWS = 20
"""Rows of a table a preview shows."""
PREVIEW_COLUMNS = 30
"""Columns of a table a preview shows."""
PREVIEW_CELL_CHARS = 200
"""Characters of one text cell (or column name) a preview shows."""
PREVIEW_TEXT_CHARS = 20_000
"""Characters of a text file a preview shows."""

TSV_SUFFIXES = (".tsv", ".tab")
TABLE_SUFFIXES = (".csv", ".parquet", *TSV_SUFFIXES)
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")


class NoPreview(Exception):
    """The upload has no preview; the message says why (it is shown to the reviewer)."""


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]
    """Column names as shown (normalised, capped)."""
    types: tuple[str, ...]
    """Each shown column's type: integer, number, boolean, datetime or text."""
    rows: tuple[tuple[str, ...], ...]
    """The shown cells, rendered from their typed values."""
    total_rows: int
    total_columns: int
    keys: tuple[str, ...] = ()
    """The parsed column names as the checks name them (to mark the cells a check flags; never shown)."""


@dataclass(frozen=True)
class Canonical:
    kind: str
    """``image``, ``table`` or ``text``."""
    mime: str
    data: bytes
    """The canonical bytes: exactly what the preview shows."""
    width: int = 0
    height: int = 0
    table: Table | None = None
    text: str = ""
    truncated: bool = False
    """A text preview shows the first :data:`PREVIEW_TEXT_CHARS` characters only."""
    beyond: tuple[str, ...] = field(default=())
    """What the upload carries that the preview leaves out (an image's metadata, trailing bytes, frames)."""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def size(self) -> int:
        return len(self.data)


def canonical_for(kind: str, filename: str, data: bytes) -> Canonical:
    """The canonical form of an upload of request kind ``kind``; raises :class:`NoPreview` saying why not."""
    if len(data) > PREVIEW_MAX_SOURCE_BYTES:
        raise NoPreview(
            f"the file has {len(data)} bytes, more than the {PREVIEW_MAX_SOURCE_BYTES} a preview parses; "
            "review it from its checks"
        )
    if kind == "weights":
        raise NoPreview("model weights have no preview: review the format, training record and audit checks")
    if kind == "figure":
        return canonical_image(data)
    if kind == "table":
        return canonical_table(data, filename)
    if kind != "other":
        raise NoPreview(f"requests of kind {kind!r} have no preview")
    if data.startswith(IMAGE_MAGIC):
        return canonical_image(data)  # a file that starts like an image is previewed as one or not at all
    if data[:4] == b"PAR1" or filename.lower().endswith(TABLE_SUFFIXES):
        return canonical_table(data, filename)
    return canonical_text(data)


def canonical_image(data: bytes) -> Canonical:
    try:
        im = reencode(data, max_pixels=PREVIEW_MAX_PIXELS, max_bytes=PREVIEW_MAX_IMAGE_BYTES)
    except ImageRefused as e:
        raise NoPreview(f"no image preview: {e}") from None
    return Canonical("image", "image/png", im.png, width=im.width, height=im.height, beyond=im.beyond_pixels)


# ---------------------------------------------------------------------------------------------------
# Tables


def read_frame(data: bytes, filename: str) -> pd.DataFrame:
    """A table as the checks and the previews read it: Parquet by content, TSV by name, else CSV (UTF-8)."""
    if data[:4] != b"PAR1" and filename.lower().endswith(TSV_SUFFIXES):
        try:
            return pd.read_csv(io.StringIO(data.decode("utf-8")), sep="\t")
        except UnicodeDecodeError:
            raise TableError(f"{filename}: not UTF-8 text; save tables with df.to_csv(sep='\\t')") from None
        except Exception as e:
            raise TableError(f"{filename}: not a readable TSV file ({e})") from None
    return read_table(data, filename)


def _parquet_cells(data: bytes) -> int:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(io.BytesIO(data)).metadata
    except Exception as e:
        raise NoPreview(f"not a readable Parquet file ({type(e).__name__})") from None
    return int(meta.num_rows) * int(meta.num_columns)


def canonical_table(data: bytes, filename: str) -> Canonical:
    """Parse a table into typed columns and render the first rows and columns from the parsed values."""
    if data[:4] == b"PAR1" and (cells := _parquet_cells(data)) > PREVIEW_MAX_CELLS:
        raise NoPreview(f"the table has {cells} cells, more than the {PREVIEW_MAX_CELLS} a preview parses")
    try:
        df = read_frame(data, filename)
    except TableError as e:
        raise NoPreview(f"no table preview: {e}") from None
    head = df.iloc[:PREVIEW_ROWS, :PREVIEW_COLUMNS]
    types = tuple(_column_type(head[c]) for c in head.columns)
    table = Table(
        columns=tuple(clean_text(str(c), PREVIEW_CELL_CHARS) for c in head.columns),
        types=types,
        rows=tuple(
            tuple(render_cell(v, t) for v, t in zip(row, types, strict=True)) for row in head.itertuples(index=False)
        ),
        total_rows=len(df),
        total_columns=len(df.columns),
        keys=tuple(str(c) for c in head.columns),
    )
    shown = {
        "columns": table.columns,
        "types": table.types,
        "rows": table.rows,
        "total_rows": table.total_rows,
        "total_columns": table.total_columns,
    }
    body = json.dumps(shown, ensure_ascii=False, separators=(",", ":")).encode()
    return Canonical("table", "application/json", body, table=table)


def _column_type(s: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(s):
        return "boolean"
    if pd.api.types.is_integer_dtype(s):
        return "integer"
    if pd.api.types.is_float_dtype(s):
        return "number"
    if pd.api.types.is_datetime64_any_dtype(s):
        return "datetime"
    return "text"


def render_cell(value: Any, kind: str) -> str:
    """One cell as text, from its parsed value: numbers re-formatted, text normalised and capped, anything
    else (bytes, nested values) named by its type only."""
    if value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return ""
    if kind == "boolean" or isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) or kind == "integer":
        try:
            return str(int(value))
        except (TypeError, ValueError, OverflowError):
            return ""
    if isinstance(value, float) or kind == "number":
        try:
            return repr(float(value))
        except (TypeError, ValueError):
            return ""
    if kind == "datetime" and hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, str):
        return clean_text(value, PREVIEW_CELL_CHARS)
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray):
        return f"({len(value)} bytes)"
    if hasattr(value, "item") and not hasattr(value, "__len__"):  # a numpy scalar
        return render_cell(value.item(), kind)
    return f"({type(value).__name__})"


# ---------------------------------------------------------------------------------------------------
# Text


def clean_text(text: str, limit: int | None = None) -> str:
    """NFC, ``\\n`` line ends, no control or format characters (tabs and newlines stay), capped at ``limit``."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c)[0] != "C")
    if limit is not None and len(text) > limit:
        return text[: limit - 1] + "…"
    return text


def canonical_text(data: bytes) -> Canonical:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise NoPreview(f"no preview: the file is neither an image, a table nor UTF-8 text (byte {e.start})") from None
    if "\x00" in text:
        raise NoPreview("no preview: the file holds NUL bytes, so it is binary, not text")
    text = clean_text(text)
    shown = text[:PREVIEW_TEXT_CHARS]
    return Canonical("text", "text/plain; charset=utf-8", shown.encode(), text=shown, truncated=len(text) > len(shown))
