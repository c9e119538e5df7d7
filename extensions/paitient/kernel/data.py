"""paitient.kernel.data: the datasets of your projects, pseudonymised at ingest.

In a notebook::

    from paitient import data
    data.catalog()                      # a table of the datasets you can use
    df = data.load("breast_cancer")     # a pandas DataFrame
    tbl = data.load("gbsg2", as_arrow=True)

Datasets are read from ``$PAITIENT_DATA_DIR`` (``/data`` in the workspace), which holds only your
projects' datasets, read-only. The operator side (``paitient ingest``, ``paitient datasets``) lives in
:mod:`paitient.services.data.ingest` and :mod:`paitient.services.data.cli`.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import TYPE_CHECKING

from paitient.catalogue import DatasetInfo, DatasetNotFound, find, scan

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    from ipywidgets import HTML

__all__ = ["DatasetInfo", "DatasetNotFound", "catalog", "datasets", "load"]

DEFAULT_DATA_DIR = "/data"


def _data_dir() -> Path:
    return Path(os.environ.get("PAITIENT_DATA_DIR") or DEFAULT_DATA_DIR)


def datasets() -> list[DatasetInfo]:
    """The datasets you can load (those of your projects), with their manifests."""
    return scan(_data_dir())


def load(name: str, *, project: str | None = None, as_arrow: bool = False) -> pd.DataFrame | pa.Table:
    """Load a dataset as a pandas DataFrame (or a ``pyarrow.Table`` with ``as_arrow=True``).

    ``name`` is the dataset's name, or ``"project/name"``; give ``project=`` when two of your projects
    have a dataset of that name.
    """
    info = find(datasets(), name, project)
    import pyarrow.parquet as pq

    table = pq.read_table(info.path / "data.parquet")
    return table if as_arrow else table.to_pandas(date_as_object=False)


def _cell(v: object) -> str:
    return "–" if v is None else html.escape(str(v))


def catalog() -> HTML:
    """An ipywidgets table of your datasets: name, project, version, rows, columns, k, description."""
    import ipywidgets

    infos = datasets()
    if not infos:
        body = f"<p>No datasets under {html.escape(str(_data_dir()))}: your projects have none published yet.</p>"
        return ipywidgets.HTML(body)
    head = "".join(
        f"<th style='text-align:left;padding:2px 8px'>{h}</th>"
        for h in ("name", "project", "version", "rows", "columns", "k", "description")
    )
    rows = []
    for i in infos:
        cols = ", ".join(i.columns)
        cells = (i.name, i.project, i.version, i.rows, len(i.columns), i.k, i.description)
        tds = "".join(f"<td style='padding:2px 8px'>{_cell(c)}</td>" for c in cells)
        rows.append(f"<tr title='{html.escape(cols, quote=True)}'>{tds}</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    hint = (
        "<p style='font-size:smaller'>Load one with <code>data.load(\"name\")</code>. k: the fewest "
        "patients (or rows) that share one combination of quasi-identifier values.</p>"
    )
    return ipywidgets.HTML(table + hint)
