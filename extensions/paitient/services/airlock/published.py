"""Checks against the published datasets themselves: row-level data never leaves.

- ``published_copy`` (every kind): the submitted bytes are not a copy of any published dataset file, of
  any project and version.
- ``row_level`` (tables): a table that has most of a dataset's columns and at least half its rows is
  row-level data, not an aggregate.

Hashes and shapes of the published files are cached by (path, size, mtime), so a dataset is read once.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from paitient.rules.disclosure import result

COLUMN_SHARE = 0.5
ROW_SHARE = 0.5


@dataclass(frozen=True)
class Published:
    name: str
    """``<project>/<dataset> v<N>``."""
    sha256: str
    columns: frozenset[str]
    rows: int


class PublishedIndex:
    """The published data files under a data root, with their SHA-256, columns and row counts."""

    def __init__(self, data_root: str | Path):
        self.data_root = Path(data_root)
        self._cache: dict[tuple[str, int, int], Published] = {}
        self._lock = threading.Lock()

    def files(self) -> list[Published]:
        out = []
        for path in sorted(self.data_root.glob("*/*/versions/*/data.parquet")):
            st = path.stat()
            key = (str(path), st.st_size, st.st_mtime_ns)
            with self._lock:
                hit = self._cache.get(key)
            if hit is None:
                hit = _describe(path)
                with self._lock:
                    self._cache[key] = hit
            out.append(hit)
        return out


def _describe(path: Path) -> Published:
    import pyarrow.parquet as pq

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    meta = pq.ParquetFile(path).metadata
    project, dataset, _, version = path.parts[-5:-1]
    return Published(
        name=f"{project}/{dataset} v{version}",
        sha256=h.hexdigest(),
        columns=frozenset(meta.schema.names),
        rows=meta.num_rows,
    )


def check_not_published(sha256: str, published: list[Published]) -> dict[str, Any]:
    for p in published:
        if p.sha256 == sha256:
            return result(
                "published_copy",
                "fail",
                f"the file is a copy of the published dataset {p.name}: row-level data never leaves the "
                "workspace; export an aggregate or a model instead",
                dataset=p.name,
            )
    return result("published_copy", "pass", "the file is not a copy of a published dataset")


def check_row_level(df: pd.DataFrame, published: list[Published]) -> dict[str, Any]:
    columns = {str(c) for c in df.columns}
    for p in published:
        if not p.columns or not p.rows:
            continue
        shared = columns & p.columns
        if len(shared) >= COLUMN_SHARE * len(p.columns) and len(df) >= ROW_SHARE * p.rows:
            return result(
                "row_level",
                "fail",
                f"the table has {len(shared)} of the {len(p.columns)} columns of {p.name} and {len(df)} "
                f"of its {p.rows} rows: that is row-level data, not an aggregate; export a summary",
                dataset=p.name,
                shared_columns=sorted(shared)[:50],
            )
    return result("row_level", "pass", "the table is not shaped like a published dataset")
