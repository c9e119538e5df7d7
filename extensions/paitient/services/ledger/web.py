"""The stewards' web page of the privacy ledger, served by the ledger service behind the hub's OAuth.

Each steward sees the projects that name them in ``stewards`` (admins see all): per dataset the
total, spent, reserved and left epsilon and delta, and the runs with their training records. Read
only; everything shown is escaped, the page carries no script. ``<prefix>api/budget`` answers the
same as JSON. The page needs the scope ``custom:ledger:read`` (see
:func:`paitient.services.ledger.service.custom_scopes`).
"""

from __future__ import annotations

import asyncio
import datetime
import html
import json
import logging
import os
from typing import Any

from jupyterhub.services.auth import HubOAuthCallbackHandler
from tornado import web

from paitient.registry import Registry
from paitient.services.kit.pages import ScopedPage, WebThread, loopback_listener
from paitient.services.kit.pages import make_app as page_app
from paitient.services.ledger.api import READ_SCOPE, public_run

_STYLE = """body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:1em}
td,th{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;font-size:13px}.left{font-weight:bold}
.out{color:#b00}.lost{color:#a60}"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def visible_projects(site, registry: Registry, username: str) -> list[str]:
    """Projects ``username`` stewards (named in the project's ``stewards``); all of them for an admin."""
    member = registry.by_username(username)
    if member is not None and "admin" in member.roles:
        return [p.name for p in site.projects]
    return [p.name for p in site.projects if username in p.stewards]


def ledger_view(ledger, projects: list[str]) -> dict[str, Any]:
    """Budgets and runs of ``projects`` (blocking: call it off the event loop)."""
    return {p: {"budget": ledger.budget(p), "runs": [public_run(r) for r in ledger.runs(p)]} for p in projects}


def _time(ts: float | None) -> str:
    if not ts:
        return ""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def render_page(view: dict[str, Any], user: str) -> str:
    """The HTML page for a :func:`ledger_view` (pure; every value escaped)."""
    parts = []
    for project, data in sorted(view.items()):
        rows = "".join(
            f"<tr><td>{_e(b['dataset'])}</td><td>{b['epsilon_total']:.4g}</td><td>{b['epsilon_spent']:.4g}</td>"
            f"<td>{b['epsilon_reserved']:.4g}</td><td class='left{' out' if b['epsilon_left'] <= 0 else ''}'>"
            f"{b['epsilon_left']:.4g}</td><td>{b['delta_total']:.3g}</td><td>{b['delta_spent']:.3g}</td>"
            f"<td>{b['delta_reserved']:.3g}</td><td>{b['delta_left']:.3g}</td><td>{_e(b['source'])}</td></tr>"
            for b in data["budget"]
        )
        runs = "".join(
            f"<tr class='{_e(r['state'])}'><td>{_e(_time(r['created']))}</td><td>{_e(r['dataset'])}</td>"
            f"<td>{_e(r['username'])}</td><td>{_e(r['state'])}</td><td>{r['epsilon']:.4g}</td>"
            f"<td>{'' if r['epsilon_spent'] is None else format(r['epsilon_spent'], '.4g')}</td>"
            f"<td>{_e((r['record'] or {}).get('mode', ''))}</td><td>{_e((r['record'] or {}).get('steps', ''))}</td>"
            f"<td><code>{_e((r['weights_sha256'] or '')[:16])}</code></td><td>{_e(r['id'])}</td></tr>"
            for r in reversed(data["runs"])
        )
        parts.append(
            f"<h2>{_e(project)}</h2><table><tr><th>dataset</th><th>epsilon total</th><th>spent</th>"
            "<th>reserved</th><th>left</th><th>delta total</th><th>spent</th><th>reserved</th><th>left</th>"
            f"<th>total set by</th></tr>{rows}</table>"
            "<table><tr><th>reserved at (UTC)</th><th>dataset</th><th>user</th><th>state</th>"
            "<th>epsilon reserved</th><th>spent</th><th>mode</th><th>steps</th><th>weights SHA-256</th>"
            f"<th>run</th></tr>{runs}</table>"
        )
    body = "".join(parts) or "<p>You steward no project.</p>"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>paitient privacy ledger</title>"
        f"<style>{_STYLE}</style></head><body><h1>Privacy-budget ledger</h1>"
        f"<p>Signed in as {_e(user)} (read-only). Runs compose by summing epsilons and deltas; a run whose "
        f"kernel ended before settling counts in full (state lost).</p>{body}</body></html>"
    )


class StewardHandler(ScopedPage):
    """Signed in through the hub with ``custom:ledger:read``; shows only the projects one stewards."""

    required_scope = READ_SCOPE
    needed_for = "the ledger page"

    def steward(self) -> str:
        return self.signed_in()

    async def view(self, username: str) -> dict[str, Any]:
        site = self.settings["paitient_site"]
        projects = visible_projects(site, Registry.for_state_dir(site.state_dir), username)
        ledger = self.settings["paitient_ledger"]
        return await asyncio.get_running_loop().run_in_executor(None, ledger_view, ledger, projects)


class LedgerPage(StewardHandler):
    @web.authenticated
    async def get(self) -> None:
        user = self.steward()
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(render_page(await self.view(user), user))


class BudgetAPI(StewardHandler):
    async def get(self) -> None:
        user = self.steward()
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"user": user, "projects": await self.view(user)}))


def make_app(site, ledger, prefix: str, *, hub_auth=None, **settings: Any) -> web.Application:
    if not prefix.endswith("/"):
        prefix += "/"
    routes = [
        (prefix, LedgerPage),
        (prefix + "api/budget", BudgetAPI),
        (prefix + "oauth_callback", HubOAuthCallbackHandler),
    ]
    return page_app(
        routes, hub_auth=hub_auth, paitient_site=site, paitient_ledger=ledger, paitient_prefix=prefix, **settings
    )


def run_in_thread(site, ledger, url: str, log: logging.Logger) -> WebThread:
    """Serve the page at ``url`` (the hub's ``JUPYTERHUB_SERVICE_URL``) on loopback, in a thread."""
    host, port = loopback_listener(url, "the ledger page")
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/ledger/")
    log.info("ledger: stewards' page on %s (prefix %s)", url, prefix)
    return WebThread(make_app(site, ledger, prefix), host, port, name="ledger").start()
