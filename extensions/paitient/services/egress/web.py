"""The stewards' egress page: what reached each researcher's browser, per day, with a plot.

Served by the egress service behind the hub's OAuth (scope ``custom:egress:read``). A steward sees the users
of the projects that name them in ``stewards`` (an admin sees everyone): per day the bytes received, the
outputs that passed and those withheld, and the distinct dataset rows seen. ``<prefix>api/egress`` answers
the same as JSON, and ``<prefix>metrics`` the service's Prometheus metrics (aggregates, for the operator's
token, :mod:`paitient.services.egress.metrics`). Read-only; every value is escaped and the page carries no
script (the plot is SVG).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from tornado import web

from paitient.config import SiteConfig
from paitient.registry import Registry
from paitient.services.egress.metrics import read_today
from paitient.services.egress.store import Day, EgressStore
from paitient.services.kit import metrics, pages
from paitient.services.kit.stewards import Reader

READ_SCOPE = "custom:egress:read"
DAYS = 30
PREFIX = "/services/egress/"


def visible_users(site: SiteConfig, registry: Registry, steward: str) -> set[str] | None:
    """Users whose egress ``steward`` may see: members of the projects they steward (None: everyone)."""
    members = Reader.of(site, registry, steward).members
    return None if members is None else set(members)


def egress_view(store: EgressStore, users: set[str] | None, days: int = DAYS) -> list[Day]:
    return [d for d in store.history(days) if users is None or d.user in users]


def plot(history: list[Day], width: int = 720, height: int = 160) -> dict[str, Any]:
    """Bars of bytes per day (all visible users together), withheld outputs marked: geometry for the SVG."""
    per_day: dict[str, list[int]] = {}
    for d in history:
        b, w = per_day.setdefault(d.day, [0, 0])
        per_day[d.day] = [b + d.bytes, w + d.withheld]
    days = sorted(per_day)
    if not days:
        return {"bars": [], "width": width, "height": height, "peak": 0}
    peak = max(b for b, _ in per_day.values()) or 1
    step = width / len(days)
    bars = []
    for i, day in enumerate(days):
        b, w = per_day[day]
        h = max(1.0, (height - 20) * b / peak)
        bars.append(
            {
                "x": round(i * step + 1, 1),
                "w": round(max(step - 2, 1), 1),
                "y": round(height - 20 - h, 1),
                "h": round(h, 1),
                "day": day,
                "bytes": b,
                "withheld": w,
            }
        )
    return {"bars": bars, "width": width, "height": height, "peak": peak}


class EgressHandler(pages.ScopedPage):
    required_scope = READ_SCOPE
    needed_for = "the egress page"

    async def view(self) -> list[Day]:
        site: SiteConfig = self.settings["paitient_site"]
        store: EgressStore = self.settings["paitient_store"]
        steward = self.username

        def read() -> list[Day]:
            return egress_view(store, visible_users(site, Registry.for_state_dir(site.state_dir), steward))

        history: list[Day] = await self.blocking(read)
        return history


class EgressPage(EgressHandler):
    async def get(self) -> None:
        history = await self.view()
        self.render_page("egress.html", history=history, plot=plot(history))


class EgressAPI(EgressHandler):
    async def get(self) -> None:
        self.write_json({"user": self.username, "days": [d.__dict__ for d in await self.view()]})


def make_app(
    site: SiteConfig,
    store: EgressStore,
    prefix: str = PREFIX,
    *,
    hub_auth: Any = None,
    registry: metrics.MetricsRegistry | None = None,
    **settings: Any,
) -> web.Application:
    """The page's application; ``hub_auth`` defaults to the HubOAuth configured from the hub's env, ``registry``
    (the service's metrics) to one with the store's totals only."""
    if registry is None:
        registry = metrics.MetricsRegistry()
        registry.register(metrics.Reading(lambda: read_today(store)))
    return pages.make_app(
        [("", EgressPage), ("api/egress", EgressAPI), metrics.ROUTE],
        service="egress",
        prefix=prefix,
        hub_auth=hub_auth,
        paitient_site=site,
        paitient_store=store,
        paitient_metrics=registry,
        **settings,
    )


def run_in_thread(
    site: SiteConfig, store: EgressStore, url: str, log: logging.Logger, registry: metrics.MetricsRegistry
) -> pages.WebThread:
    """Serve the page and the metrics at ``url`` (the hub's ``JUPYTERHUB_SERVICE_URL``) on loopback, in a thread."""
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", PREFIX)
    app = make_app(site, store, prefix, registry=registry)
    return pages.serve_pages(app, url, "egress: the stewards' page", log)
