"""What ``airlock.check`` returns: the airlock's verdict on an output before any request, shown in the notebook.

A :class:`CheckResult` holds the service's answer (every check with its status, reason, details and a concrete
fix) and, for a table, the kernel's own reading of the table, to mark the cells that failed.

What the notebook shows is output of the kernel, and output reaches the researcher's browser, outside the
workspace. So :meth:`CheckResult._repr_html_` shows each check as the requester's browser may see it on the
airlock's pages (the service's ``shown`` form: reasons capped, a parser's message about the file replaced by a
fixed text, no quoted text from details), its fix, and the failed cells of the researcher's *own* table,
rendered from the kernel's copy (the frame the researcher passed, or the file the kernel read): values the
kernel had already and could display anyway. Counts of the groups a difference across releases reveals are not
shown. The full details stay in Python, on :attr:`CheckResult.checks`, as ``airlock.status(id)`` gives them.
"""

from __future__ import annotations

import html
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from paitient.rules.disclosure import TableError, read_table

SHOWN_ROWS = 50
"""Rows holding failed cells shown under the checks (the first ones)."""
SHOWN_COLUMNS = 30
"""Columns of the table shown."""
SHOWN_CELL_CHARS = 60
"""Characters of one cell shown."""
TSV_SUFFIXES = (".tsv", ".tab")

_COLOURS = {"pass": "#1e7b34", "review": "#8a6100", "fail": "#b02a37", "error": "#8a6100"}
_CELL_FAIL = "background:#f8d7da;font-weight:bold"


def read_own_table(data: bytes, filename: str) -> pd.DataFrame | None:
    """The table as the kernel reads the bytes it sent (CSV, TSV by name, or Parquet); None when it cannot."""
    try:
        if filename.lower().endswith(TSV_SUFFIXES) and data[:4] != b"PAR1":
            return pd.read_csv(io.BytesIO(data), sep="\t")
        return read_table(data, filename)
    except (TableError, ValueError, UnicodeDecodeError):
        return None


@dataclass
class CheckResult:
    """The airlock's checks of an output, run before a request: nothing was filed, stored or released."""

    answer: dict[str, Any]
    table: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def checks(self) -> list[dict[str, Any]]:
        """Each check: ``check``, ``status`` (pass, review, fail, error), ``reason``, ``details``, ``fix``."""
        return list(self.answer.get("checks", []))

    @property
    def overall(self) -> str:
        """``fail`` when any check fails, ``review`` when a steward must judge something, else ``pass``."""
        return str(self.answer.get("overall", "review"))

    @property
    def would_fail(self) -> bool:
        """Would a request of this output have a failed check (a steward could approve it only by override)?"""
        return self.overall == "fail"

    @property
    def failed(self) -> list[str]:
        """The names of the checks that fail."""
        return [c["check"] for c in self.checks if c.get("status") == "fail"]

    @property
    def skipped(self) -> list[str]:
        """Checks not run before a request (they run when it is filed)."""
        return list(self.answer.get("skipped", []))

    def fix(self, check: str) -> str:
        """The concrete fix for one check, by name ("" when it passed or did not run)."""
        return next((str(c.get("fix", "")) for c in self.checks if c["check"] == check), "")

    @property
    def cells(self) -> dict[tuple[int, str], list[str]]:
        """The table's failed cells: ``(row, column) -> [checks]``, rows counted from 0 below the header as the
        airlock reads the table (an index written to the file is a column)."""
        out: dict[tuple[int, str], list[str]] = {}
        for c in self.checks:
            if c.get("status") == "pass":
                continue
            for cell in self._cells_of(c):
                out.setdefault(cell, []).append(c["check"])
        return out

    def _cells_of(self, check: dict[str, Any]) -> Iterable[tuple[int, str]]:
        listed = (check.get("details") or {}).get("cells") or []
        numeric: list[str] = []
        if self.table is not None:
            numeric = [str(c) for c in self.table.columns if pd.api.types.is_numeric_dtype(self.table[c])]
        for cell in listed:
            if isinstance(cell, dict) and isinstance(cell.get("row"), int):
                yield cell["row"], str(cell.get("column"))
            elif isinstance(cell, list | tuple) and len(cell) == 2 and all(isinstance(x, int) for x in cell):
                # a position in the table recomputed from the recipe: its numeric columns, in order
                row, col = cell
                if self.table is not None and row < len(self.table) and col < len(numeric):
                    yield row, numeric[col]

    # ------------------------------------------------------------------------------------------------
    # Display

    def __repr__(self) -> str:
        lines = [self._headline()]
        for c in self.checks:
            lines.append(f"  {c['status']:>6}  {c['check']}: {c['reason']}")
            if c.get("fix"):
                lines.append(f"          fix: {c['fix']}")
        cells = self.cells
        if cells:
            shown = ", ".join(f"row {r} {col!r}" for r, col in sorted(cells)[:SHOWN_ROWS])
            lines.append(f"  failed cells: {shown}")
        return "\n".join(lines)

    def _headline(self) -> str:
        what = {
            "fail": "would FAIL: a steward could release it only by overriding a failed check",
            "review": "needs a steward's judgement on some checks",
            "pass": "passes every automatic check",
        }.get(self.overall, self.overall)
        name = self.answer.get("filename") or "the output"
        skipped = f" (not run before a request: {', '.join(self.skipped)})" if self.skipped else ""
        return f"Airlock check of {name} for project {self.answer.get('project')}: {what}; no request filed{skipped}"

    def _repr_html_(self) -> str:
        rows = []
        for c in self.checks:
            shown = c.get("shown") or c
            colour = _COLOURS.get(str(c["status"]), "#333")
            rows.append(
                "<tr>"
                f'<td style="color:{colour};font-weight:bold">{html.escape(str(c["status"]))}</td>'
                f"<td>{html.escape(str(c['check']))}</td>"
                f"<td>{html.escape(str(shown.get('reason', '')))}</td>"
                f"<td>{html.escape(str(c.get('fix', '')))}</td>"
                "</tr>"
            )
        head = "".join(f"<th>{h}</th>" for h in ("status", "check", "why", "fix"))
        out = [
            f'<div class="paitient-airlock-check"><p><b>{html.escape(self._headline())}</b></p>',
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>",
        ]
        grid = self._grid_html()
        if grid:
            out.append(grid)
        out.append("</div>")
        return "".join(out)

    def _grid_html(self) -> str:
        """The rows of the researcher's own table that hold a failed cell, those cells marked."""
        cells = self.cells
        if self.table is None or not cells:
            return ""
        df = self.table
        columns = [str(c) for c in df.columns][:SHOWN_COLUMNS]
        failed = [c for c in self.checks if c.get("status") != "pass"]
        bad_headers = {str(h) for c in failed for h in (c.get("details") or {}).get("headers", [])}
        failing_rows = sorted({r for r, _ in cells if 0 <= r < len(df)})
        head = "<th>row</th>" + "".join(
            f'<th style="{_CELL_FAIL}">{html.escape(c)}</th>' if c in bad_headers else f"<th>{html.escape(c)}</th>"
            for c in columns
        )
        body = []
        for r in failing_rows[:SHOWN_ROWS]:
            tds = [f"<td>{r}</td>"]
            for j, col in enumerate(columns):
                text = html.escape(_cell_text(df.iat[r, j]))
                checks = cells.get((r, col))
                if checks:
                    tds.append(f'<td style="{_CELL_FAIL}" title="{html.escape(", ".join(checks))}">{text}</td>')
                else:
                    tds.append(f"<td>{text}</td>")
            body.append("<tr>" + "".join(tds) + "</tr>")
        more = max(0, len(failing_rows) - SHOWN_ROWS)
        note = f"<p>… and {more} more row(s) with failed cells (CheckResult.cells lists them all).</p>" if more else ""
        return (
            "<p>Rows of your table with failed cells (marked):</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{note}"
        )


def _cell_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    text = str(value)
    return text if len(text) <= SHOWN_CELL_CHARS else text[: SHOWN_CELL_CHARS - 1] + "…"
