"""The read-only web view of the trail for stewards and admins, served by the audit service.

A steward reads the records of the projects they steward and of those projects' members; an admin reads
every record; nobody reads the content of a record about themselves (:func:`as_read_by`,
:mod:`paitient.services.kit.stewards`).

Pages of the service kit (:mod:`paitient.services.kit.pages`) behind the hub's OAuth; every page needs the
custom scope ``custom:audit:read`` (:data:`paitient.services.audit.api.READ_SCOPE`). There is nothing to
change here, only filters to read with. Records are untrusted input: the templates escape every value, the
page carries no script, and the Content-Security-Policy forbids any. ``metrics`` is the operator's scraper's,
with the scope ``read:metrics`` instead (:mod:`paitient.services.audit.metrics`).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any
from urllib.parse import urlencode

from tornado import web

from paitient.registry import Registry
from paitient.services.audit import emit, trail_dir
from paitient.services.audit.api import READ_SCOPE
from paitient.services.audit.metrics import AuditMetrics
from paitient.services.audit.query import Filter, FilterError, projects_of, select
from paitient.services.audit.verify import verify_dir
from paitient.services.kit import metrics, pages
from paitient.services.kit.stewards import OWN_RECORD, Reader

PREFIX = "/services/audit/"
FILTER_KEYS = ("user", "project", "action", "outcome", "since", "until")
MAX_LIMIT = 1000
DETAIL_CHARS = 4000


def shown_details(record: dict[str, Any]) -> str:
    """A record's details as indented JSON, cut for display past :data:`DETAIL_CHARS`."""
    details = json.dumps(record.get("details", {}), indent=1, sort_keys=True, ensure_ascii=False)
    if len(details) > DETAIL_CHARS:
        details = details[:DETAIL_CHARS] + "\n... (cut for display; paitient audit show --json has all)"
    return details


def older_link(records: list[dict[str, Any]], flt_args: dict[str, str], *, limit: int) -> str | None:
    """The query of the next page of older records, if this page is full."""
    if not records or len(records) < limit:
        return None
    query = {k: v for k, v in flt_args.items() if v}
    query.update(before=str(records[-1]["seq"]), limit=str(limit))
    return "?" + urlencode(query)


def readable(record: dict[str, Any], reader: Reader, known_projects: frozenset[str]) -> bool:
    """Whether ``reader`` sees ``record`` at all: an admin every record; a steward those naming a project they
    steward, and those naming no project about a member of one (or about themselves, shown as
    :func:`as_read_by` gives it)."""
    if reader.admin:
        return True
    named = projects_of(record) & known_projects
    if named:
        return bool(named & set(reader.projects))
    return any(reader.reads_user(u) or reader.is_self(u) for u in subjects(record))


def subjects(record: dict[str, Any]) -> list[str]:
    """Whom a record is about: its actor and the user its details name."""
    details = record.get("details")
    if not isinstance(details, dict):
        details = {}
    return [u for u in (record.get("actor"), details.get("user")) if isinstance(u, str)]


def as_read_by(record: dict[str, Any], reader: Reader) -> dict[str, Any]:
    """``record`` as ``reader`` sees it: whole, unless it is about the reader. Then only its sequence number,
    time, actor, action and outcome: what their server or kernel wrote into its object and details (a cell's
    code, a file's name, a parser's message) would otherwise reach their browser past the egress gate."""
    if not any(reader.is_self(u) for u in subjects(record)):
        return record
    kept = {k: record.get(k) for k in ("seq", "time", "actor", "action", "outcome")}
    return {**kept, "object": "", "details": {"withheld": OWN_RECORD}}


class ReaderPage(pages.ScopedPage):
    """Base: signed-in through the hub, and holding ``custom:audit:read``; otherwise 403."""

    required_scope = READ_SCOPE
    needed_for = "reading the audit trail"

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
        flt = Filter.parse(
            user=args["user"],
            project=args["project"],
            action=args["action"],
            outcome=args["outcome"],
            since=args["since"],
            until=args["until"],
        )
        site = self.settings["paitient_site"]
        reader = await self.blocking(Reader.of, site, Registry.for_state_dir(site.state_dir), self.username)
        known = frozenset(p.name for p in site.projects)

        def view(record: dict[str, Any]) -> dict[str, Any] | None:
            return as_read_by(record, reader) if readable(record, reader, known) else None

        records = await self.blocking(lambda: select(trail_dir(site), flt, limit=limit, before=before, view=view))
        filters: dict[str, Any] = {k: v for k, v in args.items() if v}
        if before is not None:
            filters["before"] = before
        await self.blocking(
            lambda: emit(
                site,
                actor=self.username,
                action="audit.view",
                details={"filters": filters, "records": len(records)},
            )
        )
        return records


class RecordsPage(ReaderPage):
    async def get(self) -> None:
        args = self.filter_args()
        limit, before = self.paging()
        try:
            records, message = await self.query(args, limit, before), ""
        except FilterError as e:
            records, message = [], str(e)
        self.render_page(
            "records.html",
            records=records,
            filters=[(k, args.get(k, "")) for k in FILTER_KEYS],
            message=message,
            older=older_link(records, args, limit=limit),
            details=shown_details,
        )


class RecordsAPI(ReaderPage):
    async def get(self) -> None:
        limit, before = self.paging()
        try:
            records = await self.query(self.filter_args(), limit, before)
        except FilterError as e:
            raise web.HTTPError(400, str(e)) from None
        self.write_json({"records": records})


class VerifyPage(ReaderPage):
    async def get(self) -> None:
        report = await self.blocking(verify_dir, trail_dir(self.settings["paitient_site"]))
        self.render_page("verify.html", report=report)


def handlers() -> list[tuple[str, type]]:
    """The view's routes, relative to its prefix (e.g. ``/services/audit/``), and the metrics."""
    return [("", RecordsPage), ("verify", VerifyPage), ("api/records", RecordsAPI), metrics.ROUTE]


def make_app(
    site, prefix: str = PREFIX, *, hub_auth=None, registry: metrics.MetricsRegistry | None = None, **settings: Any
) -> web.Application:
    """The web view's application; ``hub_auth`` defaults to the HubOAuth configured from the hub's env,
    ``registry`` (the service's metrics) to one with the trail's numbers only."""
    return pages.make_app(
        handlers(),
        service="audit",
        prefix=prefix,
        hub_auth=hub_auth,
        paitient_site=site,
        paitient_metrics=registry if registry is not None else AuditMetrics(site).registry,
        **settings,
    )


def run_in_thread(site, url: str, log: logging.Logger, registry: metrics.MetricsRegistry) -> pages.WebThread:
    """Serve the web view and the metrics at ``url`` (the hub's ``JUPYTERHUB_SERVICE_URL``); loopback only."""
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", PREFIX)
    return pages.serve_pages(make_app(site, prefix, registry=registry), url, "audit: the web view", log)
