"""Read a source table (CSV, Parquet, FHIR NDJSON) into Arrow, refusing malformed input by line number."""

from __future__ import annotations

import codecs
import csv
import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from paitient.services.data import fhir
from paitient.services.data.errors import IngestRefused
from paitient.services.data.spec import Spec

RAGGED_SHOWN = 5


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _bad_encoding_line(path: Path, encoding: str) -> str:
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode(encoding)
            except UnicodeDecodeError as e:
                return (
                    f"{path.name} line {n}: not valid {encoding} text (byte {e.start + 1} of the line); "
                    'save the file as UTF-8 or name its encoding in the spec (encoding = "latin-1")'
                )
    return f"{path.name}: not valid {encoding} text; save it as UTF-8 or name its encoding in the spec"


def _header(path: Path, spec: Spec) -> list[str]:
    enc = "utf-8-sig" if codecs.lookup(spec.encoding).name == "utf-8" else spec.encoding
    try:
        with open(path, encoding=enc, newline="") as f:
            header = next(csv.reader(f, delimiter=spec.delimiter), None)
    except UnicodeDecodeError:
        raise IngestRefused(_bad_encoding_line(path, spec.encoding)) from None
    if not header:
        raise IngestRefused(f"{path.name}: empty file; the first line must name the columns")
    header = [c.strip() for c in header]  # "mrn" and " mrn" are one name, as the spec names them
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise IngestRefused(f"{path.name} line 1: column(s) named twice: {', '.join(dupes)}")
    return header


def _read(spec: Spec, column: str) -> bool:
    """Whether to read a column: all but dropped ones, and always the patient id (dates are shifted and
    k counted by it even when it is not published)."""
    rule = spec.rules.get(column)
    return rule is None or rule.action != "drop" or column == spec.patient_id


def read_csv(path: Path, spec: Spec) -> pa.Table:
    """Identifier-like columns are read as text (leading zeros matter); others get inferred types."""
    try:
        codecs.lookup(spec.encoding)
    except LookupError:
        raise IngestRefused(f"encoding = {spec.encoding!r} is not a known text encoding") from None
    columns = _header(path, spec)
    text_cols = {
        c: pa.string()
        for c, r in spec.rules.items()
        if r.action in ("pseudonym", "date_shift")
        or c == spec.patient_id
        or r.method in ("prefix", "rare", "year")
        or (r.action == "keep" and r.params.get("type") in ("string", "date"))
    }
    ragged: list[str] = []

    def on_invalid(row: pcsv.InvalidRow) -> str:
        if len(ragged) < RAGGED_SHOWN:
            where = f"line {row.number}" if row.number is not None else "a line"
            ragged.append(
                f"{path.name} {where}: {row.actual_columns} fields where the header has {row.expected_columns}; "
                "fix the row (quote fields that contain the delimiter)"
            )
        else:
            ragged.append("")
        return "skip"

    try:
        table = pcsv.read_csv(
            path,
            read_options=pcsv.ReadOptions(encoding=spec.encoding, use_threads=False, column_names=columns, skip_rows=1),
            parse_options=pcsv.ParseOptions(
                delimiter=spec.delimiter, invalid_row_handler=on_invalid, newlines_in_values=True
            ),
            convert_options=pcsv.ConvertOptions(
                column_types={c: t for c, t in text_cols.items() if c in columns},
                include_columns=[c for c in columns if _read(spec, c)],
                strings_can_be_null=True,
            ),
        )
    except pa.ArrowInvalid as e:
        if "UTF8" in str(e) or "utf-8" in str(e).lower():
            raise IngestRefused(_bad_encoding_line(path, spec.encoding)) from None
        raise IngestRefused(f"{path.name}: not a readable CSV file ({str(e).splitlines()[0]})") from None
    if ragged:
        more = len(ragged) - RAGGED_SHOWN
        shown = [r for r in ragged if r]
        if more > 0:
            shown.append(f"... and {more} more rows with the wrong number of fields")
        raise IngestRefused(shown)
    if any(pa.types.is_binary(f.type) for f in table.schema):
        raise IngestRefused(_bad_encoding_line(path, spec.encoding))
    return table


def read_parquet(path: Path, spec: Spec) -> tuple[pa.Table, list[str]]:
    """Dropped columns (but the patient id) are not read; text columns come as dictionaries (identifiers
    repeat, so every later step works on distinct values and codes instead of a million strings)."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise IngestRefused(f"{path.name}: not a readable Parquet file ({e})") from None
    dupes = sorted({n for n in schema.names if schema.names.count(n) > 1})
    if dupes:
        raise IngestRefused(f"{path.name}: column(s) named twice: {', '.join(dupes)}; write each once")
    try:
        wanted = [f.name for f in schema if _read(spec, f.name)]
        text = [
            f.name
            for f in schema
            if f.name in wanted and (pa.types.is_string(f.type) or pa.types.is_large_string(f.type))
        ]
        # ParquetFile.read gives a chunk per row group (read_table cuts batches, each with the whole dictionary)
        table = pq.ParquetFile(path, read_dictionary=text).read(columns=wanted)
    except (pa.ArrowInvalid, OSError) as e:
        raise IngestRefused(f"{path.name}: not a readable Parquet file ({e})") from None
    return table, schema.names


def read_source(spec: Spec) -> tuple[pa.Table, list[str]]:
    """The source as a table plus all its column names (dropped columns, but the patient id, are not even read)."""
    path = spec.source
    if not path.is_file():
        raise IngestRefused(f"source {path} does not exist or is not a file")
    if spec.format == "csv":
        return read_csv(path, spec), _header(path, spec)
    if spec.format == "parquet":
        return read_parquet(path, spec)
    table = fhir.read_ndjson(path, spec.resource)
    return table, table.column_names
