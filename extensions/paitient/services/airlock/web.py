"""The airlock's pages under ``/services/airlock/``: requests, review, download. Signed in through the hub.

The pages are the service kit's (:mod:`paitient.services.kit.pages`): the hub's OAuth says who the user is
and which airlock scopes their token carries (``custom:airlock:request``, ``...:review``, ``...:download``);
every page requires the access scope of the service, and :class:`paitient.services.airlock.core.Airlock`
decides what each user may see and do. Pages are Jinja templates extending the kit's base (escaped), forms
carry the hub's XSRF token, and a strict Content-Security-Policy allows no script at all.

Previews of an upload go to the project's reviewers only and are rendered from its canonical form, each one
recorded in the audit trail first (:mod:`paitient.services.airlock.previews`); every other browser, the
requester's included, gets the request without its content (:mod:`paitient.services.airlock.views`).
``metrics`` has the airlock's queues for the operator's scraper (:mod:`paitient.services.airlock.metrics`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from functools import partial
from typing import Any
from urllib.parse import quote

from jupyterhub.services.auth import HubOAuth
from tornado import web

from paitient.rules import differencing, review
from paitient.services.airlock import views
from paitient.services.airlock.canonical import Canonical, NoPreview, Page
from paitient.services.airlock.core import Airlock
from paitient.services.airlock.metrics import airlock_registry
from paitient.services.airlock.previews import PreviewUnrecorded
from paitient.services.airlock.settings import SCOPE_REQUEST, SCOPE_REVIEW
from paitient.services.airlock.store import StoreError
from paitient.services.kit import metrics, pages

PREFIX = "/services/airlock/"
ACCESS_SCOPE = "access:services!service=airlock"
ID_RE = r"([0-9]{8}-[0-9a-f]{8})"


class AirlockHandler(pages.ScopedPage):
    """Base: the hub's OAuth for identity, the airlock for permissions, blocking work off the event loop."""

    required_scope = ACCESS_SCOPE
    needed_for = "the airlock"

    def initialize(self) -> None:
        super().initialize()
        self.airlock: Airlock = self.settings["airlock"]

    async def run(self, fn, *args, **kwargs):
        return await self.blocking(partial(fn, *args, **kwargs))

    async def load(self, rid: str):
        return await self.run(self._load, rid, self.username, self.scopes)

    def _load(self, rid: str, username: str, scopes: set[str]):
        try:
            req = self.airlock.store.get(rid)
        except StoreError:
            raise web.HTTPError(404, f"there is no airlock request {rid}") from None
        if not self.airlock.may_view(username, scopes, req):
            raise web.HTTPError(
                403, f"request {rid} is not yours, not of a project you review, and not released to a project of yours"
            )
        return req

    def template_namespace(self) -> dict[str, Any]:
        return {
            **super().template_namespace(),
            "json": json,
            "label": lambda s: s.replace("_", " "),
            "when": lambda ts: time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)),
        }


class ListHandler(AirlockHandler):
    async def get(self) -> None:
        reqs, reviewable, overridden = await self.run(self._listing, self.username, self.scopes)
        self.render_page(
            "list.html",
            requests=reqs,
            reviewable=reviewable,
            overridden=overridden,
            can_request=SCOPE_REQUEST in self.scopes,
            can_review=SCOPE_REVIEW in self.scopes,
        )

    def _listing(self, username: str, scopes: set[str]):
        """Each visible request as the reader may see it (:func:`views.public_for`)."""
        found = self.airlock.visible(username, scopes)
        may = self.airlock.may_preview
        reqs = [views.public_for(r, reviewer=may(username, scopes, r)) for r in found]
        reviewable = set(self.airlock.steward_projects(username, scopes))
        return reqs, reviewable, self.airlock.store.overridden([r.id for r in found])


class DetailHandler(AirlockHandler):
    async def get(self, rid: str) -> None:
        page = Page(self._start("rows"), self._start("columns"))
        self.render_page("detail.html", **await self.run(self._detail, rid, self.username, self.scopes, page))

    def _start(self, name: str) -> int:
        """Where the table preview's page starts (``?rows=200&columns=30``: 0-based), 0 when not given."""
        value = self.get_query_argument(name, "0")
        if not value.isdigit() or len(value) > 9:
            raise web.HTTPError(400, f"{name} must be a row or column number where a preview page starts")
        return int(value)

    def _detail(self, rid: str, username: str, scopes: set[str], page: Page | None = None) -> dict[str, Any]:
        req = self._load(rid, username, scopes)
        airlock = self.airlock
        is_reviewer = airlock.may_review(username, scopes, req)
        may_preview = airlock.may_preview(username, scopes, req)
        preview = self._preview(rid, username, scopes, page) if may_preview else None
        unread = self._unread(req, username) if may_preview else []
        # Without its audit record a reviewer's page shows nothing of the upload: not even the checks' details.
        sees_content = preview is not None and not preview.get("unrecorded")
        info = airlock.describe_for_reviewer(req, username) if sees_content else airlock.describe_for_requester(req)
        record = next(
            (
                c["details"].get("record")
                for c in info["checks"]
                if c["check"] == "training_record" and c.get("details")
            ),
            None,
        )
        flagged = {
            (cell["row"], cell["column"])
            for c in info["checks"]
            if c["status"] == "fail"
            for cell in (c.get("details") or {}).get("cells", [])
            if isinstance(cell, dict)
        }
        try:
            approvals, refused = airlock.approvals_needed(req), None
        except review.TransitionError as e:
            approvals, refused = None, str(e)
        graph = self._graph(req) if sees_content else None
        if graph is not None and not graph.error and is_reviewer and req.username != username:
            airlock.graph_read(req, username)  # approving the graph for automatic release needs it read
        events = airlock.store.events(rid)
        return dict(
            req=req,
            shown=info if sees_content else views.shown_request(req.public()),
            info=info,
            justification=info["justification"],
            # A requester's history leaves out the reviewers' page views (they tell the table's shape) and
            # keeps the rest to the minute.
            events=events
            if sees_content
            else [dataclasses.replace(e, ts=views.minute(e.ts)) for e in events if e.type != "preview"],
            rounded=not sees_content and req.state != review.RELEASED,
            record=record,
            flagged=flagged,
            preview=preview,
            sees_content=sees_content,
            is_reviewer=is_reviewer,
            is_requester=req.username == username,
            can_decide=is_reviewer and req.username != username and req.state == review.IN_REVIEW,
            can_download=airlock.may_download(username, scopes, req),
            approvals_needed=approvals,
            refused=refused,
            certified=views.certified_facts(info["checks"]) if sees_content else None,
            graph=graph,
            standing=airlock.graph_standing(req) if graph is not None else None,
            username=username,
            self_reported=req.kind == "weights" and not req.meta.get("job"),
            policy=next((c for c in info["checks"] if c["check"] == "policy"), None),
            failed=[c["check"] for c in info["checks"] if c["status"] == "fail"],
            earlier_override=next(
                (e.data["override"] for e in airlock.store.events(rid, "decision") if e.data.get("override")), ""
            ),
            min_override=review.MIN_OVERRIDE,
            differences=self._differences(req, info["checks"]) if sees_content else [],
            unread=unread,
        )

    def _graph(self, req: Any) -> views.GraphListing | None:
        """The listing of the graph a training job trained (from the runner), for a reviewer's page."""
        sha = req.meta.get("graph_listing") if req.kind == "weights" else None
        if not isinstance(sha, str):
            return None
        try:
            return views.graph_listing(self.airlock.store.read_blob(sha))
        except (OSError, ValueError, KeyError, TypeError) as e:
            return views.GraphListing((), (), f"the graph's listing cannot be read ({type(e).__name__})")

    def _differences(self, req: Any, checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The request's count table beside the earlier releases its differencing check found differences
        with, for a reviewer's page; empty when the check found none. A table the reader filed themselves is
        left out (their kernel wrote its labels and numbers; another steward reads them): the page says so."""
        check = next((c for c in checks if c["check"] == "differencing"), None)
        details = (check or {}).get("details") or {}
        # the reader's own tables are named apart (Airlock.describe_for_reviewer), their differences left out
        own = {str(r) for r in details.get("own", [])}
        if not details.get("findings") and not own:
            return []
        tables = self.airlock.tables
        ids = [str(r) for r in details.get("earlier", []) if str(r) not in own]
        found = tables.tables(req.project, [req.id, *ids])
        if req.id not in found:
            return []
        earlier = [(rid, found[rid][0]) for rid in ids if rid in found and rid not in own]
        views = [
            {"view": view, "states": [(rid, found[rid][1]) for rid in view.earlier], "own": []}
            for view in differencing.side_by_side(found[req.id][0], earlier, self.airlock.settings.min_count)
        ]
        if own:
            views.append({"view": None, "states": [], "own": sorted(own)})
        return views

    def _unread(self, req: Any, username: str) -> list[Page]:
        try:
            return self.airlock.previews.unread(req, username)[1]
        except NoPreview:
            return []  # the page says why there is no preview

    def _preview(self, rid: str, username: str, scopes: set[str], page: Page | None) -> dict[str, Any]:
        """What the page shows as the preview: from the canonical form, recorded; or why there is none."""
        try:
            shown = self.airlock.previews.show(rid, username=username, scopes=scopes, via="page", page=page)
        except NoPreview as e:
            return {"error": str(e)}
        except PreviewUnrecorded as e:
            return {"error": str(e), "unrecorded": True}
        return {"kind": shown.kind, "shown": shown}


class DecisionHandler(AirlockHandler):
    async def post(self, rid: str) -> None:
        await self.load(rid)
        action = self.get_body_argument("action", "")
        comment = self.get_body_argument("comment", "")
        override = self.get_body_argument("override", "")
        confirm = self.get_body_argument("confirm_override", "") == "yes"
        try:
            await self.run(
                self.airlock.decide,
                rid,
                username=self.username,
                scopes=self.scopes,
                action=action,
                comment=comment,
                override=override,
                confirm_override=confirm,
            )
        except review.TransitionError as e:
            raise web.HTTPError(e.status, str(e)) from None
        self.redirect(f"{self.prefix}requests/{rid}", status=303)


class GraphHandler(AirlockHandler):
    """A steward approves the graph of a request's certified weights for automatic release, or revokes that."""

    async def post(self, rid: str) -> None:
        await self.load(rid)
        try:
            await self.run(
                self.airlock.decide_graph,
                rid,
                username=self.username,
                scopes=self.scopes,
                action=self.get_body_argument("action", ""),
                reason=self.get_body_argument("reason", ""),
            )
        except review.TransitionError as e:
            raise web.HTTPError(e.status, str(e)) from None
        self.redirect(f"{self.prefix}requests/{rid}#graph-approval", status=303)


class DownloadHandler(AirlockHandler):
    part = "file"

    async def get(self, rid: str) -> None:
        try:
            req, data = await self.run(
                self.airlock.download,
                rid,
                username=self.username,
                scopes=self.scopes,
                client=self.request.remote_ip or "",
                part=self.part,
            )
        except StoreError:
            raise web.HTTPError(404, f"there is no airlock request {rid}") from None
        except LookupError as e:
            raise web.HTTPError(404, str(e)) from None
        except PermissionError as e:
            raise web.HTTPError(403, str(e)) from None
        except Exception:
            self.airlock.log.exception("download of %s refused: no audit record", rid)
            raise web.HTTPError(
                503,
                "the download could not be recorded in the audit trail, so it is refused; ask the workspace operator",
            ) from None
        name = req.filename if self.part == "file" else f"{req.meta['job']}.record.json"
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header("Content-Disposition", f"attachment; filename*=UTF-8''{quote(name)}")
        self.set_header("X-Airlock-SHA256", req.sha256)
        self.finish(data)


class RecordDownloadHandler(DownloadHandler):
    """The signed training record of released certified weights, to check them offline with
    ``paitient jobs verify --record ... --weights ... --public-key ...``."""

    part = "record"


class PublicKeyHandler(AirlockHandler):
    """The training runner's public key (public by design), for checking released records offline."""

    async def get(self) -> None:
        from paitient.rules.training_record import public_key_text

        try:
            key = await self.run(self.airlock.jobs_public_key)
        except OSError:
            raise web.HTTPError(404, "this workspace has no training runner key yet: no job has run") from None
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.set_header("Content-Disposition", "attachment; filename*=UTF-8''jobs-signing.pub")
        self.finish(public_key_text(key))


class PreviewImageHandler(AirlockHandler):
    """The image preview: the canonical PNG (:mod:`.canonical`), for the project's reviewers only, recorded."""

    async def get(self, rid: str) -> None:
        shown = await self.run(self._image, rid, self.username, self.scopes)
        self.set_header("Content-Type", shown.mime)
        self.set_header("Content-Disposition", "inline")
        self.set_header("X-Preview-SHA256", shown.sha256)
        self.finish(shown.data)

    def _image(self, rid: str, username: str, scopes: set[str]) -> Canonical:
        self._load(rid, username, scopes)
        try:
            shown = self.airlock.previews.show(rid, username=username, scopes=scopes, via="image")
        except PermissionError as e:
            raise web.HTTPError(403, str(e)) from None
        except NoPreview as e:
            raise web.HTTPError(404, str(e)) from None
        except PreviewUnrecorded as e:
            raise web.HTTPError(503, str(e)) from None
        if shown.kind != "image":
            raise web.HTTPError(404, f"no image preview: this request's preview is {shown.kind}, shown on its page")
        return shown


class ApiListHandler(AirlockHandler):
    async def get(self) -> None:
        self.write_json({"requests": await self.run(self._listing, self.username, self.scopes)})

    def _listing(self, username: str, scopes: set[str]) -> list[dict[str, Any]]:
        may = self.airlock.may_preview
        return [views.public_for(r, reviewer=may(username, scopes, r)) for r in self.airlock.visible(username, scopes)]


class ApiDetailHandler(AirlockHandler):
    async def get(self, rid: str) -> None:
        self.write_json(await self.run(self._info, rid, self.username, self.scopes))

    def _info(self, rid: str, username: str, scopes: set[str]) -> dict[str, Any]:
        req = self._load(rid, username, scopes)
        return self.airlock.describe_for(req, username=username, scopes=scopes)


def make_app(
    airlock: Airlock,
    *,
    prefix: str = PREFIX,
    hub_auth: HubOAuth | None = None,
    cookie_secret: bytes | None = None,
    **extra: Any,
) -> web.Application:
    """The tornado application; ``hub_auth`` defaults to the hub's OAuth configured from the service env."""
    routes = [
        ("", ListHandler),
        (f"requests/{ID_RE}", DetailHandler),
        (f"requests/{ID_RE}/decision", DecisionHandler),
        (f"requests/{ID_RE}/graph", GraphHandler),
        (f"requests/{ID_RE}/download", DownloadHandler),
        (f"requests/{ID_RE}/record", RecordDownloadHandler),
        ("jobs-signing.pub", PublicKeyHandler),
        (f"requests/{ID_RE}/preview", PreviewImageHandler),
        ("api/requests", ApiListHandler),
        (f"api/requests/{ID_RE}", ApiDetailHandler),
        metrics.ROUTE,
    ]
    return pages.make_app(
        routes,
        service="airlock",
        prefix=prefix,
        hub_auth=hub_auth,
        cookie_secret=cookie_secret,
        airlock=airlock,
        paitient_metrics=airlock_registry(airlock),
        **extra,
    )
