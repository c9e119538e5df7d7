"""The stewards' web page of the privacy ledger, served by the ledger service behind the hub's OAuth.

Each steward sees the projects that name them in ``stewards`` (admins see all): per dataset the
total, spent, reserved and left epsilon and delta, and the runs with their training records; of their own
runs, which their kernel settled, only the budget (:func:`own_run`). Read
only; the page is a template of the service kit (:mod:`paitient.services.kit.pages`), so everything
shown is escaped and it carries no script. ``<prefix>api/budget`` answers the same as JSON. Both need
the scope ``custom:ledger:read`` (:data:`paitient.services.ledger.api.READ_SCOPE`). ``<prefix>metrics`` has
the budgets summed over each project's researchers for the operator's scraper (``read:metrics``,
:mod:`paitient.services.kit.metrics`).
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path
from typing import Any

from tornado import web

from paitient.registry import Registry
from paitient.services.kit import metrics, pages, render
from paitient.services.kit.stewards import OWN_RECORD, Reader
from paitient.services.ledger.api import READ_SCOPE, public_run, trained_by
from paitient.services.ledger.metrics import ledger_registry

TEMPLATES = Path(__file__).parent / "templates"
PREFIX = "/services/ledger/"


def visible_projects(site, registry: Registry, username: str) -> list[str]:
    """Projects ``username`` stewards (named in the project's ``stewards``); all of them for an admin."""
    return list(Reader.of(site, registry, username).projects)


OWN_RUN_FIELDS = ("id", "project", "dataset", "username", "state", "created", "closed")
"""What a reader sees of a run of their own (the numbers rounded: :func:`own_run`)."""
OWN_RUN_NUMBERS = ("epsilon", "delta", "epsilon_spent", "delta_spent")


def significant(value: Any, digits: int = 4) -> Any:
    """A number to ``digits`` significant digits (as the page prints it); anything else as it is."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(f"{value:.{digits}g}")
    return value


def shown_budget(entry: dict[str, Any]) -> dict[str, Any]:
    """A dataset's budget as the page prints it: epsilon and delta figures to four significant digits. The
    sums take in what each researcher's kernel reserved and settled, to the last digit it chose."""
    return {k: significant(v) if k.startswith(("epsilon_", "delta_")) else v for k, v in entry.items()}


def own_run(row: dict[str, Any]) -> dict[str, Any]:
    """A run as its own researcher sees it on a steward's page: its budget to four significant digits, without
    the training record, the run id and the weights' hash that their kernel wrote
    (:mod:`paitient.services.kit.stewards`)."""
    out: dict[str, Any] = {k: row.get(k) for k in OWN_RUN_FIELDS}
    for key in OWN_RUN_NUMBERS:
        value = row.get(key)
        out[key] = significant(value) if isinstance(value, int | float) else None
    out.update(record={}, weights_sha256=None, withheld=OWN_RECORD, trained_by=trained_by(row))
    return out


def ledger_view(ledger, projects: list[str], reader: str = "") -> dict[str, Any]:
    """Budgets (:func:`shown_budget`) and runs of ``projects`` (blocking: call it off the event loop); the runs
    of ``reader`` as :func:`own_run` gives them."""

    def shown(row: dict[str, Any]) -> dict[str, Any]:
        return own_run(row) if reader and row.get("username") == reader else public_run(row)

    return {
        p: {"budget": [shown_budget(b) for b in ledger.budget(p)], "runs": [shown(r) for r in ledger.runs(p)]}
        for p in projects
    }


def utc_time(ts: float | None) -> str:
    if not ts:
        return ""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def page_values(view: dict[str, Any]) -> dict[str, Any]:
    """The template's values for a :func:`ledger_view`: projects in name order, runs newest first."""
    return {
        "projects": [
            {"name": name, "budget": data["budget"], "runs": list(reversed(data["runs"]))}
            for name, data in sorted(view.items())
        ],
        "when": utc_time,
    }


def render_page(view: dict[str, Any], user: str, *, prefix: str = PREFIX) -> str:
    """The HTML page for a :func:`ledger_view` outside a request (pure; every value escaped)."""
    namespace = render.base_namespace(service="ledger", prefix=prefix, user={"name": user})
    return render.render(render.environment(TEMPLATES), "ledger.html", namespace, **page_values(view))


class StewardPage(pages.ScopedPage):
    """Signed in through the hub with ``custom:ledger:read``; shows only the projects one stewards."""

    required_scope = READ_SCOPE
    needed_for = "the ledger page"

    async def view(self) -> dict[str, Any]:
        site = self.settings["paitient_site"]
        projects = visible_projects(site, Registry.for_state_dir(site.state_dir), self.username)
        return await self.blocking(ledger_view, self.settings["paitient_ledger"], projects, self.username)


class LedgerPage(StewardPage):
    async def get(self) -> None:
        self.render_page("ledger.html", **page_values(await self.view()))


class BudgetAPI(StewardPage):
    async def get(self) -> None:
        self.write_json({"user": self.username, "projects": await self.view()})


def make_app(site, ledger, prefix: str = PREFIX, *, hub_auth=None, **settings: Any) -> web.Application:
    """The page's application; ``hub_auth`` defaults to the HubOAuth configured from the hub's env."""
    routes = [("", LedgerPage), ("api/budget", BudgetAPI), metrics.ROUTE]
    return pages.make_app(
        routes,
        service="ledger",
        prefix=prefix,
        hub_auth=hub_auth,
        paitient_site=site,
        paitient_ledger=ledger,
        paitient_metrics=ledger_registry(site, ledger),
        **settings,
    )


def run_in_thread(site, ledger, url: str, log: logging.Logger) -> pages.WebThread:
    """Serve the page at ``url`` (the hub's ``JUPYTERHUB_SERVICE_URL``) on loopback, in a thread."""
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", PREFIX)
    return pages.serve_pages(make_app(site, ledger, prefix), url, "ledger: the stewards' page", log)
