"""The canonical forms of an upload. Pure.

**The release form** (:func:`canonical_output`): at request time the airlock parses every output by its
declared kind and stores a re-encoding instead of the researcher's bytes; that re-encoding is what the checks
judge, what reviewers preview and what is released, and its SHA-256 is the request's:

- ``table``: parsed (Parquet by content, TSV by name, else UTF-8 CSV) into typed columns and re-written from
  those cells as UTF-8 CSV (``\\n`` line ends, no index unless it carries values), or as XLSX when asked
  (``format="xlsx"``, :mod:`paitient.services.airlock.xlsx`): no container metadata (Parquet schema and
  key-value metadata, document properties) survives. Text cells and column names are normalised (NFC, ``\\n``
  line ends, no control characters); in the CSV, those a spreadsheet would run as formulas get a single quote
  in front (:mod:`paitient.rules.formulas`; the XLSX types them as text). Columns holding bytes or nested
  values are refused;
- ``figure``: decoded as PNG, JPEG or GIF and its first frame's pixels re-encoded as a PNG without metadata or
  trailing bytes (:mod:`paitient.services.airlock.images`), within :data:`MAX_PIXELS` and
  :data:`MAX_IMAGE_BYTES`;
- ``other``: an image if it starts like one, a table if it is Parquet or named like a table (of at most
  :data:`PREVIEW_ROWS` rows and :data:`PREVIEW_COLUMNS` columns), else UTF-8 text, normalised as above, of at
  most :data:`TEXT_MAX_CHARS` characters: no disclosure check reads them, so a steward reads them whole;
- ``weights``: the tensors re-serialised by safetensors without metadata
  (:func:`paitient.services.airlock.weights.canonical_bytes`), so the file's SHA-256 is the canonical parameter
  hash. Certified weights of a training job are not re-encoded: they come from the runner, whose signature
  covers their exact bytes.

Anything that does not parse into its declared kind is refused (:class:`Refused`) with what to do instead.

**The preview** (:func:`canonical_for`) is rendered from the stored (release) form, so a reviewer sees the
released bytes:

- ``image``: the PNG itself;
- ``table``: one page of :data:`PREVIEW_ROWS` rows and :data:`PREVIEW_COLUMNS` columns rendered cell by cell
  from the parsed values (as JSON); a longer or wider table is read page by page (:class:`Page`), and a
  reviewer approves it only once they have opened every page;
- ``text``: the normalised text, whole (up to :data:`PREVIEW_TEXT_CHARS` characters, as many as the airlock
  takes).

Anything that does not parse into one of these has no preview, and :class:`NoPreview` says why.
:attr:`Canonical.data` holds exactly what a preview shows; the audit trail records its SHA-256.
"""

from __future__ import annotations

import decimal
import hashlib
import io
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from paitient.rules import formulas
from paitient.rules.disclosure import TableError, read_table
from paitient.rules.edm.tokens import LETTERS
from paitient.services.airlock import xlsx
from paitient.services.airlock.images import ImageRefused, reencode

PREVIEW_MAX_SOURCE_BYTES = 64 << 20
"""Largest upload parsed for a preview; a larger one is reviewed from its checks (and in the workspace)."""
PREVIEW_MAX_PIXELS = 40_000_000
"""Most pixels an image preview decodes (checked before decoding: a decompression bomb is refused)."""
PREVIEW_MAX_IMAGE_BYTES = 32 << 20
"""Largest re-encoded PNG a preview serves."""
PREVIEW_MAX_CELLS = 20_000_000
"""Most cells (rows x columns, from the Parquet footer) a table preview parses."""
PREVIEW_ROWS = 200
"""Rows of a table a preview shows: all of an ``other`` table (which may have no more), the first ones of a
``table`` (whose every cell the checks read)."""
PREVIEW_COLUMNS = 30
"""Columns of a table a preview shows."""
PREVIEW_CELL_CHARS = 200
"""Characters of one text cell (or column name) a preview shows."""
TEXT_MAX_CHARS = 100_000
"""Most characters a text output (kind ``other``) may have: a steward reads it whole before it leaves, so the
preview shows all of it and a longer text is refused at the request."""
PREVIEW_TEXT_CHARS = TEXT_MAX_CHARS
"""Characters of a text file a preview shows: all of a text the airlock takes."""

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
    page: Page = field(default_factory=lambda: Page())
    """Where the shown rows and columns start in the table."""

    @property
    def pages(self) -> tuple[Page, ...]:
        """Every page of the table, row pages within column pages."""
        return pages_of(self.total_rows, self.total_columns)


@dataclass(frozen=True, order=True)
class Page:
    """A page of a table's preview: its first row and first column (multiples of the page's size)."""

    first_row: int = 0
    first_column: int = 0

    def describe(self, total_rows: int, total_columns: int) -> str:
        last_row = min(self.first_row + PREVIEW_ROWS, total_rows)
        last_column = min(self.first_column + PREVIEW_COLUMNS, total_columns)
        return f"rows {self.first_row + 1}-{last_row}, columns {self.first_column + 1}-{last_column}"


def pages_of(total_rows: int, total_columns: int) -> tuple[Page, ...]:
    """The pages a table of this shape is read in (one, for an empty table)."""
    return tuple(
        Page(r, c)
        for c in range(0, max(total_columns, 1), PREVIEW_COLUMNS)
        for r in range(0, max(total_rows, 1), PREVIEW_ROWS)
    )


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


def canonical_for(kind: str, filename: str, data: bytes, page: Page | None = None) -> Canonical:
    """The canonical form of an upload of request kind ``kind`` (of a table, its ``page``, the first by
    default); raises :class:`NoPreview` saying why not."""
    shown_as = preview_kind(kind, filename, data)
    if page is not None and page != Page() and shown_as != "table":
        raise NoPreview(f"this preview is {shown_as}, shown whole: only a table's preview has pages")
    if shown_as == "image":
        return canonical_image(data)
    if shown_as == "table":
        return canonical_table(data, filename, page)
    return canonical_text(data)


def preview_kind(kind: str, filename: str, data: bytes) -> str:
    """What an upload of request kind ``kind`` is previewed as (``image``, ``table`` or ``text``), read from
    its kind, its first bytes and its name only; :class:`NoPreview` when it has none."""
    if len(data) > PREVIEW_MAX_SOURCE_BYTES:
        raise NoPreview(
            f"the file has {len(data)} bytes, more than the {PREVIEW_MAX_SOURCE_BYTES} a preview parses; "
            "review it from its checks"
        )
    if kind == "weights":
        raise NoPreview("model weights have no preview: review the format, training record and audit checks")
    if kind in ("figure", "table"):
        return "image" if kind == "figure" else "table"
    if kind != "other":
        raise NoPreview(f"requests of kind {kind!r} have no preview")
    if data.startswith(IMAGE_MAGIC):
        return "image"  # a file that starts like an image is previewed as one or not at all
    if data[:4] == b"PAR1" or filename.lower().endswith(TABLE_SUFFIXES):
        return "table"
    return "text"


def canonical_image(data: bytes) -> Canonical:
    try:
        im = reencode(data, max_pixels=PREVIEW_MAX_PIXELS, max_bytes=PREVIEW_MAX_IMAGE_BYTES)
    except ImageRefused as e:
        raise NoPreview(f"no image preview: {e}") from None
    return Canonical("image", "image/png", im.png, width=im.width, height=im.height, beyond=im.beyond_pixels)


# ---------------------------------------------------------------------------------------------------
# Tables


def read_frame(data: bytes, filename: str) -> pd.DataFrame:
    """A table as the checks, the release form and the previews read it: Parquet by content, TSV by name, else
    CSV (UTF-8). Numbers are parsed exactly (``float_precision="round_trip"``), so re-writing them changes no
    digit."""
    if data[:4] == b"PAR1" and data[-4:] == b"PAR1":
        return read_table(data, filename)
    tsv = filename.lower().endswith(TSV_SUFFIXES)
    what = "TSV" if tsv else "CSV"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        hint = "df.to_csv(sep='\\t')" if tsv else "df.to_csv or df.to_parquet"
        raise TableError(f"{filename}: neither Parquet nor UTF-8 {what}; save tables with {hint}") from None
    try:
        return pd.read_csv(io.StringIO(text), sep="\t" if tsv else ",", float_precision="round_trip")
    except Exception as e:
        raise TableError(f"{filename}: not a readable {what} file ({e})") from None


def _parquet_cells(data: bytes, error: type[Exception] = NoPreview) -> int:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(io.BytesIO(data)).metadata
    except Exception as e:
        raise error(f"not a readable Parquet file ({type(e).__name__})") from None
    return int(meta.num_rows) * int(meta.num_columns)


def canonical_table(data: bytes, filename: str, page: Page | None = None) -> Canonical:
    """Parse a table into typed columns and render one page of its rows and columns (the first by default)
    from the parsed values."""
    page = page or Page()
    if data[:4] == b"PAR1" and (cells := _parquet_cells(data)) > PREVIEW_MAX_CELLS:
        raise NoPreview(f"the table has {cells} cells, more than the {PREVIEW_MAX_CELLS} a preview parses")
    try:
        df = read_frame(data, filename)
    except TableError as e:
        raise NoPreview(f"no table preview: {e}") from None
    if page not in pages_of(len(df), len(df.columns)):
        raise NoPreview(
            f"the table has {len(df)} rows and {len(df.columns)} columns, read in pages that start every "
            f"{PREVIEW_ROWS} rows and {PREVIEW_COLUMNS} columns: there is no page at row {page.first_row + 1}, "
            f"column {page.first_column + 1}"
        )
    head = df.iloc[
        page.first_row : page.first_row + PREVIEW_ROWS, page.first_column : page.first_column + PREVIEW_COLUMNS
    ]
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
        page=page,
    )
    shown = {
        "columns": table.columns,
        "types": table.types,
        "rows": table.rows,
        "total_rows": table.total_rows,
        "total_columns": table.total_columns,
        **({"first_row": page.first_row, "first_column": page.first_column} if page != Page() else {}),
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


INVISIBLE = frozenset(
    [0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x2800, 0x3164, 0xFFA0]
    + list(range(0x180B, 0x1810))
    + list(range(0xFE00, 0xFE10))
    + list(range(0xE0100, 0xE01F0))
)
"""Code points a screen shows as nothing though they are no control or format character (combining grapheme
joiner, variation selectors, Hangul fillers, Mongolian selectors, the braille blank): dropped, or a cell could
look like ``x`` and carry hundreds of bits."""


_OTHER_DIGIT = re.compile(r"(?![0-9])\d")
"""A decimal digit of another style or script (mathematical ``𝟤``, full-width ``２``, Arabic-Indic ``٢``)."""


def clean_text(text: str, limit: int | None = None) -> str:
    """NFC, ``\\n`` line ends (the line and paragraph separators too), no control or format characters (tabs and
    newlines stay), none of
    :data:`INVISIBLE`, every other space (no-break, thin, ideographic ...) a plain one, every decimal digit an
    ASCII one (a mathematical ``𝟤`` reads as ``2``: which of the two a text holds was a bit a digit that the
    steward could not see); capped at ``limit``."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n")
    text = unicodedata.normalize("NFC", text)
    if not text.isascii():
        text = _OTHER_DIGIT.sub(lambda m: str(unicodedata.decimal(m.group())), text)
    text = "".join(
        " " if unicodedata.category(c) == "Zs" else c
        for c in text
        if c in "\n\t" or (unicodedata.category(c)[0] != "C" and ord(c) not in INVISIBLE)
    )
    if limit is not None and len(text) > limit:
        return text[: limit - 1] + "…"
    return text


def shown_text(text: str) -> str:
    """A text output as it is released: :func:`clean_text`, tabs expanded to spaces (every 8 columns), every
    run of spaces after a line's indentation one space, no whitespace at a line's end and at most one line end
    at the end of the text: what a preview shows of it is then every character that leaves (a reader does not
    count the spaces between two words)."""
    lines = []
    for line in clean_text(text).split("\n"):
        line = line.expandtabs(8).rstrip()
        body = line.lstrip(" ")
        lines.append(line[: len(line) - len(body)] + _SPACES.sub(" ", body))
    return "\n".join(lines).rstrip("\n") + ("\n" if text.endswith(("\n", "\r", "\u2028", "\u2029")) else "")


_SPACES = re.compile(" {2,}")
_LETTERS = re.compile(r"[^\W\d_]+")
_WITH_LATIN = frozenset({"CJK", "HIRAGANA", "KATAKANA", "HANGUL", "BOPOMOFO"})
"""Scripts a word may mix with Latin letters (Japanese, Chinese and Korean writing do; UTS #39's highly
restrictive level)."""


def _script(letter: str) -> str:
    """A letter's script as its Unicode name begins (``LATIN``, ``CYRILLIC``, ``GREEK``, ``MATHEMATICAL``,
    ``FULLWIDTH`` ...); ``""`` for modifier letters, which go with any script."""
    name = unicodedata.name(letter, "")
    first = name.split(" ", 1)[0]
    return "" if first == "MODIFIER" else first


def _looks_latin(letter: str) -> bool:
    """Whether a reader takes ``letter`` for a Latin letter or a digit (Cyrillic ``о``, Greek ``Ρ``,
    mathematical ``𝐏``, fullwidth ``Ｐ``)."""
    return letter in LETTERS or unicodedata.normalize("NFKC", letter).isascii()


def mixed_script_words(text: str) -> int:
    """How many words of ``text`` mix letters of different scripts (Latin with Cyrillic or Greek look-alikes,
    mathematical or fullwidth letters among plain ones), or are written wholly in letters a reader takes for
    Latin ones and are not (Cyrillic ``Сох``, mathematical ``𝐏𝐚𝐭𝐢𝐞𝐧𝐭``): a reader sees one word, and each
    letter, or each word, is a bit. Greek letters no reader takes for Latin ones may stand in a Latin word, as
    medicine writes them (``TNFα``, ``IFNγ``, ``μg``)."""
    count = 0
    for word in _LETTERS.findall(text):
        if word.isascii():
            continue
        scripts = {_script(c) for c in word} - {""}
        if scripts - {"LATIN"} and all(_looks_latin(c) for c in word):
            count += 1  # wholly look-alike: a Latin word by sight, another by its code points
            continue
        if len(scripts) < 2 or scripts <= {"LATIN", *_WITH_LATIN}:
            continue
        others = [c for c in word if _script(c) not in ("LATIN", "")]
        if scripts <= {"LATIN", "GREEK", "MICRO"} and not any(_looks_latin(c) for c in others):
            continue
        count += 1
    return count


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


# ---------------------------------------------------------------------------------------------------
# The release form: what the airlock stores, reviewers see and a release hands out

MAX_SOURCE_BYTES = PREVIEW_MAX_SOURCE_BYTES
"""Largest table, figure or text the airlock parses into its release form (weights: the service's max_bytes)."""
MAX_PIXELS = PREVIEW_MAX_PIXELS
"""Most pixels a figure may have (checked before decoding)."""
MAX_IMAGE_BYTES = PREVIEW_MAX_IMAGE_BYTES
"""Largest re-encoded PNG the airlock stores."""
MAX_CELLS = PREVIEW_MAX_CELLS
"""Most cells (rows x columns, from the Parquet footer) of a Parquet table the airlock parses."""
TABLE_FORMATS = ("csv", "xlsx")
"""What a table may be released as; CSV unless the request asks for XLSX."""
XLSX_MIME = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
SCALAR_COLUMNS = {
    "string",
    "empty",
    "integer",
    "floating",
    "mixed-integer-float",
    "decimal",
    "boolean",
    "date",
    "datetime",
    "datetime64",
}
"""What :func:`pandas.api.types.infer_dtype` may call a column of object values a released table keeps."""
_PLAIN = r"[^\t\n\x20-\x7e]"
"""A text cell with any character outside these is normalised with :func:`clean_text`."""


class Refused(ValueError):
    """The upload does not parse into its declared kind; the message says why and what to do."""


@dataclass(frozen=True)
class Output:
    """An upload's release form."""

    data: bytes
    filename: str
    """The upload's name with the suffix of the form (``t.parquet`` released as CSV is ``t.csv``)."""
    form: str
    """``csv``, ``xlsx``, ``png``, ``text`` or ``safetensors``."""
    dropped: tuple[str, ...] = ()
    """What the upload carried that the release form leaves out, by type and size (never quoted)."""
    cells: bytes = b""
    """For XLSX: the same cells as canonical CSV, for the checks and the preview."""
    quoted: int = 0
    """For CSV: how many text cells and column names a spreadsheet would have run as formulas, written with a
    single quote in front (:mod:`paitient.rules.formulas`)."""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def canonical_output(
    kind: str,
    filename: str,
    data: bytes,
    *,
    table_format: str | None = None,
    max_pages: int | None = None,
    max_side: int | None = None,
) -> Output:
    """The release form of an upload of request kind ``kind``; raises :class:`Refused` saying why not.
    ``max_pages``: the most preview pages (:func:`pages_of`) a table may fill, as a steward must open each;
    ``max_side``: the most pixels a figure may have in width and in height, as a steward sees it at full size."""
    if table_format not in (None, *TABLE_FORMATS):
        raise Refused(f"format must be one of {', '.join(TABLE_FORMATS)}; got {table_format!r}")
    if table_format is not None and kind != "table":
        raise Refused(f"format= goes with kind='table' only; this request is kind={kind!r}")
    if kind == "weights":
        from paitient.services.airlock.weights import WeightsFormatError, canonical_bytes

        try:
            return Output(canonical_bytes(data), _renamed(filename, ".safetensors"), "safetensors")
        except WeightsFormatError as e:
            raise Refused(str(e)) from None
    if len(data) > MAX_SOURCE_BYTES:
        raise Refused(
            f"the file has {len(data)} bytes, more than the {MAX_SOURCE_BYTES} the airlock parses for a {kind}; "
            "release a smaller output (a summary table, a figure at a lower resolution)"
        )
    if kind == "figure":
        return image_output(filename, data, max_side=max_side)
    if kind == "table":
        return table_output(filename, data, table_format or "csv", max_pages=max_pages)
    if kind != "other":
        raise Refused(f"the airlock has no release form for kind {kind!r}")
    if data.startswith(IMAGE_MAGIC):
        # a file that starts like an image is released as one or not at all
        return image_output(filename, data, max_side=max_side)
    if data[:4] == b"PAR1" or filename.lower().endswith(TABLE_SUFFIXES):
        return table_output(filename, data, "csv", whole=True)
    return text_output(filename, data)


def _renamed(filename: str, suffix: str) -> str:
    stem, dot, ext = filename.rpartition(".")
    base = stem if dot and stem else filename
    return base + suffix


def image_output(filename: str, data: bytes, *, max_side: int | None = None) -> Output:
    try:
        im = reencode(data, max_pixels=MAX_PIXELS, max_bytes=MAX_IMAGE_BYTES)
    except ImageRefused as e:
        raise Refused(
            f"the file is not a figure the airlock releases: {e}; save figures as PNG, e.g. plt.savefig('figure.png')"
        ) from None
    if max_side is not None and max(im.width, im.height) > max_side:
        raise Refused(
            f"the figure is {im.width}x{im.height} pixels; a steward sees a figure at full size, one pixel of it to "
            f"one of the page, so it may be at most {max_side} pixels wide and high ([airlock] max_figure_side): "
            "save it smaller, e.g. plt.savefig('figure.png', dpi=150)"
        )
    return Output(im.png, _renamed(filename, ".png"), "png", dropped=im.beyond_pixels)


def table_output(
    filename: str, data: bytes, table_format: str, *, whole: bool = False, max_pages: int | None = None
) -> Output:
    """Parse a table and re-write it from its cells: CSV, or XLSX (with the same cells as CSV alongside).
    ``whole``: the table of an ``other`` output, which no disclosure check reads, so a steward's preview must
    show all of it: refused beyond :data:`PREVIEW_ROWS` rows or :data:`PREVIEW_COLUMNS` columns.
    ``max_pages``: refused beyond that many preview pages, which a steward would have to open one by one."""
    dropped: list[str] = []
    if data[:4] == b"PAR1":
        if (cells := _parquet_cells(data, Refused)) > MAX_CELLS:
            raise Refused(f"the table has {cells} cells, more than the {MAX_CELLS} the airlock parses")
        dropped.extend(_parquet_metadata(data))
    try:
        df = read_frame(data, filename)
    except TableError as e:
        raise Refused(f"the file is not a table the airlock releases: {e}") from None
    frame, plain, read = read_back(canonical_frame(df))
    if whole and (len(frame) > PREVIEW_ROWS or len(frame.columns) > PREVIEW_COLUMNS):
        raise Refused(
            f"the table has {len(frame)} rows and {len(frame.columns)} columns; as kind 'other' (no automatic "
            f"disclosure check) a steward reads it whole, so it may have at most {PREVIEW_ROWS} rows and "
            f"{PREVIEW_COLUMNS} columns: release an aggregate as kind='table', or a smaller table"
        )
    if whole and (mixed := _mixed_script_cells(frame)):
        raise Refused(
            f"{mixed} column name(s) or text cell(s) of the table have a word that mixes letters of different "
            "scripts (a Cyrillic or Greek letter among Latin ones, a mathematical or fullwidth letter among plain "
            "ones) or is written wholly in letters that look Latin and are not, which a reader cannot tell from a "
            "Latin word: write each word in one script, and a Latin word in plain Latin letters"
        )
    if max_pages is not None and (pages := len(pages_of(len(frame), len(frame.columns)))) > max_pages:
        raise Refused(
            f"the table has {len(frame)} rows and {len(frame.columns)} columns, {pages} preview pages of "
            f"{PREVIEW_ROWS} rows by {PREVIEW_COLUMNS} columns; a steward opens every page before approving, so "
            f"a table may fill at most {max_pages} ([airlock] max_table_pages): release an aggregate of it, or "
            "split it into smaller tables"
        )
    # A CSV says nothing of types, so text a spreadsheet would run is quoted; an XLSX types its text cells.
    shown, quoted = (frame, 0) if table_format == "xlsx" else formulas.quote_frame(frame)
    _within_a_preview_cell(shown)  # as stored: a formula's quote counts
    csv = plain if quoted == 0 else frame_csv(shown)
    if csv.startswith((*IMAGE_MAGIC, b"PAR1")):
        raise Refused(
            "the table's first column name makes its CSV start like an image or a Parquet file; rename that column"
        )
    if table_format == "xlsx":
        return Output(
            frame_xlsx(xlsx_cells(frame, read)), _renamed(filename, ".xlsx"), "xlsx", tuple(dropped), cells=csv
        )
    return Output(csv, _renamed(filename, ".csv"), "csv", tuple(dropped), quoted=quoted)


def _mixed_script_cells(frame: pd.DataFrame) -> int:
    """How many column names and text cells of ``frame`` hold a word that mixes scripts (an ``other`` table has
    no labels check, which holds a table's text to the catalogue's spellings)."""
    texts = [str(c) for c in frame.columns]
    for i in range(len(frame.columns)):
        texts.extend(v for v in frame.iloc[:, i].tolist() if isinstance(v, str) and not v.isascii())
    return sum(mixed_script_words(t) > 0 for t in texts)


def _parquet_metadata(data: bytes) -> list[str]:
    """Count the Parquet file's key-value metadata, which the CSV leaves out. The keys are the researcher's
    text, so they are counted, never named: a requester's browser sees this line."""
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(io.BytesIO(data)).metadata.metadata or {}
    except Exception:
        return []
    if not meta:
        return []
    size = sum(len(k) + len(v) for k, v in meta.items())
    return [f"{len(meta)} Parquet key-value metadata entr{'ies' if len(meta) > 1 else 'y'} ({size} bytes)"]


def canonical_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The typed cells a table is released with: an index that carries values becomes columns, column names
    and text cells are normalised, and a column of anything but numbers, text, booleans and dates is refused."""
    if not (isinstance(df.index, pd.RangeIndex) and df.index.start == 0 and df.index.step == 1) or any(
        n is not None for n in df.index.names
    ):
        df = df.reset_index()
    if isinstance(df.columns, pd.MultiIndex):
        df.columns = [" / ".join(str(p) for p in c) for c in df.columns]
    out = {}
    names = [cell_text(str(c)) for c in df.columns]
    for i, name in enumerate(names):
        s = df.iloc[:, i]
        if s.dtype == object or isinstance(s.dtype, pd.StringDtype | pd.CategoricalDtype):
            s = _text_column(name, s)
        elif pd.api.types.is_timedelta64_dtype(s) or pd.api.types.is_complex_dtype(s):
            raise Refused(f"column {name!r} holds {s.dtype} values; release numbers, text, booleans or dates")
        out[i] = s.reset_index(drop=True)
    frame = pd.DataFrame(out)
    frame.columns = pd.Index(names, dtype=object)
    return frame


def _text_column(name: str, s: pd.Series) -> pd.Series:
    if isinstance(s.dtype, pd.CategoricalDtype):
        s = s.astype(object)
    inferred = pd.api.types.infer_dtype(s, skipna=True)
    if inferred not in SCALAR_COLUMNS:
        raise Refused(
            f"column {name!r} holds {inferred} values; a released table holds numbers, text, booleans and dates "
            "only: convert or drop the column"
        )
    if inferred != "string":
        return s
    s = s.astype(object)
    odd = s.str.contains(_PLAIN, regex=True, na=False) | s.str.contains(_LOOSE_SPACE, regex=True, na=False)
    if odd.any():
        s = s.copy()
        s[odd] = s[odd].map(cell_text)
    # Empty text is no text: the CSV the checks and the preview read writes both as nothing, so an XLSX must
    # too, or each blank cell would be a bit (a cell holding "" or no cell) nobody saw.
    blank = s.map(lambda v: isinstance(v, str) and not v).astype(bool)
    if blank.any():
        s = s.copy()
        s[blank] = None
    return s


_LOOSE_SPACE = r"^\s|\s$|\s\s|[\t\n]"
"""A text cell with whitespace a preview's cell does not show as it is (leading, trailing, a run of it, a tab
or a line end): normalised with :func:`cell_text`."""


def cell_text(text: str) -> str:
    """A table's text cell or column name as it is released: :func:`clean_text`, with no leading or trailing
    whitespace and every run of it (tabs and line ends too) one space, as a page shows a cell anyway: the
    steward sees every character that leaves."""
    return " ".join(clean_text(text).split())


def _within_a_preview_cell(frame: pd.DataFrame) -> None:
    """Refuse a table with a column name or text cell longer than a preview shows of one
    (:data:`PREVIEW_CELL_CHARS`): the steward would approve characters they were never shown."""
    long = sum(len(str(c)) > PREVIEW_CELL_CHARS for c in frame.columns)
    for i in range(len(frame.columns)):
        column = frame.iloc[:, i]
        if column.dtype == object:
            try:
                lengths = column.str.len()  # NaN (no text) is not long
            except AttributeError:  # dates, decimals or mixed values: only the text among them
                lengths = column.map(lambda v: len(v) if isinstance(v, str) else 0)
            long += int((lengths > PREVIEW_CELL_CHARS).sum())
    if long:
        raise Refused(
            f"{long} column name(s) or text cell(s) of the table have more than {PREVIEW_CELL_CHARS} characters, "
            "more than a steward's preview shows of one: shorten them, or release long text as a text file "
            "(kind='other', .txt), which a steward reads whole"
        )


READ_BACK_ROUNDS = 3


def read_back(frame: pd.DataFrame) -> tuple[pd.DataFrame, bytes, pd.DataFrame]:
    """``frame`` as the checks and the previews read its CSV back, once that reading is stable, with that CSV
    and the frame they read from it: what is released is then written from exactly the values they judged and
    showed. A text cell that reads back as a number (``0120``, ``120.000000000000000000031415``, a zero-width
    character after the digits) or as nothing (``NA``) is released as what it reads as, so no digit or word the
    checks did not see leaves with it. A column that reads back as the same CSV keeps its type (an XLSX keeps
    its dates as dates; :func:`xlsx_cells` says which it does not)."""
    current = frame
    for _ in range(READ_BACK_ROUNDS):
        csv = frame_csv(current)
        again = canonical_frame(read_frame(csv, "cells.csv"))
        if list(again.columns) != list(current.columns):
            current = again
            continue
        changed = [i for i in range(len(current.columns)) if not _reads_back(current.iloc[:, i], again.iloc[:, i])]
        if not changed:
            return current, csv, again
        current = current.copy()
        for i in changed:
            current.isetitem(i, again.iloc[:, i])
    raise Refused(
        "the table's cells do not read back the same after being written as CSV; write its columns as plain "
        "numbers, text or dates and send it again"
    )


def _reads_back(written: pd.Series, read: pd.Series) -> bool:
    """Does a column read back as it was written: the same values of the same type, or else (a date read
    back as text) the same CSV?"""
    if written.dtype == read.dtype and written.equals(read):
        return True

    def text(s: pd.Series) -> str:
        return str(s.to_csv(index=False, header=False, lineterminator="\n"))

    return text(written) == text(read)


def xlsx_cells(frame: pd.DataFrame, read: pd.DataFrame) -> pd.DataFrame:
    """The cells an XLSX is written from, so that it types each column as the preview does: ``frame``'s (see
    :func:`read_back`), but a column the preview reads from the CSV (``read``) as numbers or booleans (text
    digits, ``True``) is written as those, and dates with a time zone as the text the preview shows (a sheet
    holds no time zone; it would show them in UTC). Dates without one stay dates."""
    cells = frame
    for i in range(len(frame.columns)):
        written, shown = frame.iloc[:, i], read.iloc[:, i]
        if written.dtype == shown.dtype:
            continue
        numbers = pd.api.types.is_numeric_dtype(shown.dtype) or pd.api.types.is_bool_dtype(shown.dtype)
        if numbers or _zoned(written):
            if cells is frame:
                cells = frame.copy()
            cells.isetitem(i, shown)
    return cells


def _zoned(s: pd.Series) -> bool:
    """Does a column hold dates with a time zone?"""
    if isinstance(s.dtype, pd.DatetimeTZDtype):
        return True
    return s.dtype == object and any(getattr(v, "tzinfo", None) is not None for v in s.to_numpy())


def frame_csv(frame: pd.DataFrame) -> bytes:
    buf = io.StringIO()
    frame.to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue().encode("utf-8")


def frame_xlsx(frame: pd.DataFrame) -> bytes:
    """One sheet of the cells, every text cell written as text (never a formula), with fixed time stamps and no
    document properties, so the same cells always give the same bytes (:mod:`paitient.services.airlock.xlsx`)."""
    try:
        return xlsx.write(frame)
    except ValueError as e:  # too large for a sheet; a value no cell holds (canonical_frame leaves none)
        raise Refused(f"the table cannot be written as XLSX: {e}; release it as CSV (no format='xlsx')") from None


def xlsx_frame(data: bytes) -> pd.DataFrame:
    """Read a canonical XLSX back (the airlock's own output only: uploads in XLSX are not taken)."""
    return pd.read_excel(io.BytesIO(data), engine="openpyxl")


TEXT_MAX_BYTES = 4 * TEXT_MAX_CHARS + 3
"""A text longer than this (a BOM and four bytes a character at most) has more than :data:`TEXT_MAX_CHARS`
characters: refused from its size, before the airlock decodes and normalises it."""


def text_output(filename: str, data: bytes) -> Output:
    if len(data) > TEXT_MAX_BYTES:
        raise Refused(
            f"the file has {len(data)} bytes, so more than the {TEXT_MAX_CHARS} characters a steward reads whole "
            "before a text leaves; release a shorter text, or the numbers as a table"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise Refused(
            "the file is neither an image (PNG, JPEG, GIF), a table (CSV, TSV, Parquet) nor UTF-8 text "
            f"(byte {e.start} is not UTF-8); export it as one of those"
        ) from None
    if "\x00" in text:
        raise Refused("the file holds NUL bytes, so it is binary, not text; export it as a table, figure or text")
    text = shown_text(text)
    if mixed := mixed_script_words(text):
        raise Refused(
            f"{mixed} word(s) of the text mix letters of different scripts (a Cyrillic or Greek letter among "
            "Latin ones, a mathematical or fullwidth letter among plain ones) or are written wholly in letters "
            "that look Latin and are not, which a reader cannot tell from a Latin word: write each word in one "
            "script, and a Latin word in plain Latin letters (a Greek letter that looks like no Latin one may "
            "stand in a Latin word, as in TNFα)"
        )
    if len(text) > TEXT_MAX_CHARS:
        raise Refused(
            f"the text has {len(text)} characters, more than the {TEXT_MAX_CHARS} a steward reads whole before it "
            "leaves; release a shorter text, or the numbers as a table"
        )
    return Output(text.encode("utf-8"), filename, "text")
