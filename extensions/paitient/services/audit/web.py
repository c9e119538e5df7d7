"""The read-only web view of the trail for stewards and admins, served by the audit service.

A small tornado app behind the hub's OAuth (``HubOAuthenticated``); every page needs the custom scope
``custom:audit:read`` (see :func:`paitient.services.audit.service.custom_scopes`). There is nothing to change
here, only filters to read with. Records are untrusted input: every value is HTML-escaped, the page
carries no script, and a Content-Security-Policy forbids any.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import os
from typing import Any
from urllib.parse import urlencode

from jupyterhub.services.auth import HubOAuthCallbackHandler
from tornado import web

from paitient.services.audit import emit, trail_dir
from paitient.services.audit.query import Filter, FilterError, select
from paitient.services.audit.verify import verify_dir
from paitient.services.kit.pages import ScopedPage, WebThread, loopback_listener
from paitient.services.kit.pages import make_app as page_app

READ_SCOPE = "custom:audit:read"
FILTER_KEYS = ("user", "project", "action", "outcome", "since", "until")
MAX_LIMIT = 1000
DETAIL_CHARS = 4000

_STYLE = """body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;width:100%}
td,th{border-bottom:1px solid #ddd;padding:4px;vertical-align:top;text-align:left;font-size:13px}
pre{margin:0;white-space:pre-wrap;word-break:break-all;max-height:20em;overflow:auto}
.denied{color:#a60}.error{color:#b00}form input{width:9em}.bad{color:#b00;font-weight:bold}.good{color:#070}"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def render_records(
    records: list[dict[str, Any]], flt_args: dict[str, str], *, prefix: str, limit: int, user: str, message: str = ""
) -> str:
    """The page for a list of records (pure: the same input gives the same HTML; everything escaped)."""
    form = "".join(f'<label>{k} <input name="{k}" value="{_e(flt_args.get(k, ""))}"></label> ' for k in FILTER_KEYS)
    rows = []
    for r in records:
        details = json.dumps(r.get("details", {}), indent=1, sort_keys=True, ensure_ascii=False)
        if len(details) > DETAIL_CHARS:
            details = details[:DETAIL_CHARS] + "\n... (cut for display; paitient audit show --json has all)"
        rows.append(
            f'<tr class="{_e(r.get("outcome", ""))}"><td>{_e(r.get("seq"))}</td><td>{_e(r.get("time"))}</td>'
            f"<td>{_e(r.get('actor'))}</td><td>{_e(r.get('action'))}</td><td>{_e(r.get('object'))}</td>"
            f"<td>{_e(r.get('outcome'))}</td><td><pre>{_e(details)}</pre></td></tr>"
        )
    older = ""
    if len(records) >= limit and records:
        query = {k: v for k, v in flt_args.items() if v}
        query.update(before=str(records[-1]["seq"]), limit=str(limit))
        older = f'<p><a href="{_e(prefix)}?{_e(urlencode(query))}">older records</a></p>'
    note = f'<p class="bad">{_e(message)}</p>' if message else ""
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>paitient audit trail</title>"
        f"<style>{_STYLE}</style></head><body><h1>Audit trail</h1>"
        f"<p>Signed in as {_e(user)} (read-only). <a href='{_e(prefix)}verify'>Verify the chain</a></p>"
        f"<form method='get' action='{_e(prefix)}'>{form}<button>filter</button></form>{note}"
        f"<p>{len(records)} record(s), newest first.</p>"
        "<table><tr><th>seq</th><th>time (UTC)</th><th>actor</th><th>action</th><th>object</th><th>outcome</th>"
        f"<th>details</th></tr>{''.join(rows)}</table>{older}</body></html>"
    )


def render_verify(report, prefix: str) -> str:
    status = (
        f"<p class='good'>Intact: {report.records} records in {report.files} file(s), last seq "
        f"{_e(report.last_seq)}.</p>"
        if report.ok
        else f"<p class='bad'>BROKEN at {_e(report.first_problem)}</p>"
    )
    items = "".join(f"<li>{_e(p)}</li>" for p in report.problems[1:])
    notes = "".join(f"<li>{_e(n)}</li>" for n in report.notes)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>paitient audit: verify</title>"
        f"<style>{_STYLE}</style></head><body><h1>Audit trail: chain check</h1>{status}"
        f"{'<h2>More problems</h2><ul>' + items + '</ul>' if items else ''}"
        f"{'<h2>Recovered crashes</h2><ul>' + notes + '</ul>' if notes else ''}"
        f"<p><a href='{_e(prefix)}'>back to the records</a></p></body></html>"
    )


class ReaderHandler(ScopedPage):
    """Base: signed-in through the hub, and holding ``custom:audit:read``; otherwise 403."""

    required_scope = READ_SCOPE
    needed_for = "reading the audit trail"

    def reader(self) -> str:
        return self.signed_in()

    def filter_args(self) -> dict[str, str]:
        return {k: self.get_argument(k, "")[:200] for k in FILTER_KEYS}

    def paging(self) -> tuple[int, int | None]:
        try:
            limit = min(max(int(self.get_argument("limit", "200")), 1), MAX_LIMIT)
            before = self.get_argument("before", "")
            return limit, int(before) if before else None
        except ValueError:
            raise web.HTTPError(400, "limit and before must be whole numbers") from None

    async def query(self, args: dict[str, str], limit: int, before: int | None) -> list[dict[str, Any]]:
        """Matching records; the reading itself is recorded (``audit.view``): who looked at what."""
        flt = Filter.parse(**args)
        site = self.settings["paitient_site"]
        loop = asyncio.get_running_loop()
        records = await loop.run_in_executor(None, lambda: select(trail_dir(site), flt, limit=limit, before=before))
        filters = {k: v for k, v in args.items() if v}
        if before is not None:
            filters["before"] = before
        await loop.run_in_executor(
            None,
            lambda: emit(
                site,
                actor=self.current_user["name"],
                action="audit.view",
                details={"filters": filters, "records": len(records)},
            ),
        )
        return records


class RecordsPage(ReaderHandler):
    @web.authenticated
    async def get(self) -> None:
        user = self.reader()
        args = self.filter_args()
        limit, before = self.paging()
        try:
            records = await self.query(args, limit, before)
            message = ""
        except FilterError as e:
            records, message = [], str(e)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(
            render_records(
                records, args, prefix=self.settings["paitient_prefix"], limit=limit, user=user, message=message
            )
        )


class RecordsAPI(ReaderHandler):
    async def get(self) -> None:
        self.reader()
        limit, before = self.paging()
        try:
            records = await self.query(self.filter_args(), limit, before)
        except FilterError as e:
            raise web.HTTPError(400, str(e)) from None
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"records": records}))


class VerifyPage(ReaderHandler):
    @web.authenticated
    async def get(self) -> None:
        self.reader()
        directory = trail_dir(self.settings["paitient_site"])
        report = await asyncio.get_running_loop().run_in_executor(None, verify_dir, directory)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(render_verify(report, self.settings["paitient_prefix"]))


def handlers(prefix: str) -> list[tuple[str, type]]:
    """URL handlers under ``prefix`` (ends with '/'), e.g. ``/services/audit/``."""
    return [
        (prefix, RecordsPage),
        (prefix + "verify", VerifyPage),
        (prefix + "api/records", RecordsAPI),
        (prefix + "oauth_callback", HubOAuthCallbackHandler),
    ]


def make_app(site, prefix: str, *, hub_auth=None, **settings: Any) -> web.Application:
    """The web view's application; ``hub_auth`` defaults to the HubOAuth configured from the hub's env."""
    if not prefix.endswith("/"):
        prefix += "/"
    return page_app(handlers(prefix), hub_auth=hub_auth, paitient_site=site, paitient_prefix=prefix, **settings)


def run_in_thread(site, url: str, log: logging.Logger) -> WebThread:
    """Serve the web view at ``url`` (the hub's ``JUPYTERHUB_SERVICE_URL``); loopback addresses only."""
    host, port = loopback_listener(url, "the audit web view")
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/audit/")
    app = make_app(site, prefix)
    log.info("audit: web view on %s (prefix %s)", url, prefix)
    return WebThread(app, host, port, name="audit").start()
