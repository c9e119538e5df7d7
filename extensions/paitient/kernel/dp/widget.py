"""``dp.budget()``: the project's privacy budget per dataset, as widgets, with spending over time."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from html import escape
from typing import TYPE_CHECKING, Any

from paitient.kernel.ledger import LedgerClient

if TYPE_CHECKING:
    from ipywidgets import VBox


def spending_series(runs: Iterable[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Per dataset, the cumulative epsilon counted after each run closed (settled: spent; lost: reserved).

    Open reservations are not in the series (they are shown as "reserved" beside it).
    """
    events: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        if r["state"] == "settled":
            amount = r["epsilon_spent"] or 0.0
        elif r["state"] == "lost":
            amount = r["epsilon"]
        else:
            continue
        events.setdefault(r["dataset"], []).append((r["closed"] or r["created"], amount))
    series = {}
    for ds, ev in events.items():
        total, points = 0.0, []
        for t, amount in sorted(ev):
            total += amount
            points.append((t, total))
        series[ds] = points
    return series


def budget_table_html(project: str, rows: list[dict[str, Any]]) -> str:
    """An HTML table of one project's budget rows (as the ledger's ``budget`` call answers them); where the
    project bounds each member's share, a column with the epsilon still open to the caller."""
    shared = any(r.get("member_share", 1.0) < 1 and "epsilon_left_member" in r for r in rows)
    head = (
        "<tr><th>dataset</th><th>epsilon total</th><th>spent</th><th>reserved</th><th>left</th>"
        + ("<th>left for you</th>" if shared else "")
        + "<th>delta total</th><th>delta left</th><th>runs</th></tr>"
    )
    body = "".join(
        f"<tr><td>{escape(r['dataset'])}</td><td>{r['epsilon_total']:.4g}</td><td>{r['epsilon_spent']:.4g}</td>"
        f"<td>{r['epsilon_reserved']:.4g}</td><td><b>{r['epsilon_left']:.4g}</b></td>"
        + (f"<td><b>{r.get('epsilon_left_member', r['epsilon_left']):.4g}</b></td>" if shared else "")
        + f"<td>{r['delta_total']:.3g}</td><td>{r['delta_left']:.3g}</td><td>{r['runs']}</td></tr>"
        for r in rows
    )
    note = (
        f"<p>One member may use at most {rows[0]['member_share']:.3g} of each dataset's epsilon (member_share).</p>"
        if shared
        else ""
    )
    return f"<h4>Privacy budget of {escape(project)}</h4><table>{head}{body}</table>{note}"


def spending_png(series: dict[str, list[tuple[float, float]]], totals: dict[str, float]) -> bytes:
    """A PNG plot of each dataset's cumulative spending over time, its total dashed."""
    import datetime

    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 2.8), dpi=90)
    ax = fig.add_subplot()
    for i, (ds, points) in enumerate(sorted(series.items())):
        times = np.array([datetime.datetime.fromtimestamp(t) for t, _ in points], dtype="datetime64[us]")
        ax.step(times, [v for _, v in points], where="post", marker="o", label=ds, color=f"C{i}")
        if ds in totals:
            ax.axhline(totals[ds], linestyle="--", linewidth=0.8, color=f"C{i}")
    ax.set_ylabel("epsilon spent")
    ax.set_title("spending over time (dashed: total)")
    if series:
        ax.legend(loc="upper left", fontsize="small")
    fig.autofmt_xdate()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def budget(
    project: str | None = None, *, run_dir: str | os.PathLike[str] | None = None, client: LedgerClient | None = None
) -> VBox:
    """The budget of your projects (or one) per dataset: total, spent, reserved, left, and a plot."""
    import ipywidgets as widgets

    client = client if client is not None else LedgerClient(run_dir)
    answer = client.budget(project)
    boxes: list[VBox] = []
    for name, rows in sorted(answer["projects"].items()):
        bars = [
            widgets.FloatProgress(
                value=min(r["epsilon_spent"] + r["epsilon_reserved"], r["epsilon_total"]),
                min=0.0,
                max=r["epsilon_total"],
                description=r["dataset"],
                bar_style="danger" if r["epsilon_left"] <= 0 else "info",
            )
            for r in rows
        ]
        series = spending_series(client.records(project=name))
        png = spending_png(series, {r["dataset"]: r["epsilon_total"] for r in rows})
        boxes.append(
            widgets.VBox([widgets.HTML(budget_table_html(name, rows)), *bars, widgets.Image(value=png, format="png")])
        )
    if not boxes:
        boxes.append(widgets.HTML("<p>You are not a member of any project with a privacy budget.</p>"))
    return widgets.VBox(boxes)
