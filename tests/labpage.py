"""JupyterLab in the system Chromium, driven as a researcher drives it: what the browser tests share."""

from __future__ import annotations

import re
from typing import Any

CELLS = ".jp-Notebook .jp-Cell"


def wait_for_kernel(page: Any, timeout: float = 60_000) -> None:
    """Until the notebook's kernel is connected and idle: the status bar then reads "<kernel> | Idle".

    Not JupyterLab's execution indicator, which reads idle before the notebook has its kernel: a cell run
    then sends nothing (the cell keeps its "[ ]" prompt, no request leaves the browser, and Shift+Enter
    moves on to a new cell)."""
    page.locator(".jp-StatusBar-TextItem", has_text=re.compile(r"\| Idle$")).first.wait_for(timeout=timeout)


def run_cell(page: Any, code: str, wait_for: str, timeout: float = 90_000) -> Any:
    """Type ``code`` into the notebook's last cell, run it with Shift+Enter, and wait for ``wait_for`` (a
    selector) in that cell; returns the cell. It is held by its position: running it adds a new last cell."""
    cells = page.locator(CELLS)
    cell = cells.nth(cells.count() - 1)
    cell.locator(".cm-content").click()
    page.keyboard.type(code)
    page.keyboard.press("Shift+Enter")
    try:
        cell.locator(wait_for).first.wait_for(timeout=timeout)
    except Exception as e:  # noqa: BLE001 - reported with what the notebook shows
        shown = page.locator(".jp-Notebook").inner_text()[-1500:]
        raise AssertionError(f"no {wait_for} after {code!r}; the notebook shows:\n{shown}") from e
    return cell
