"""The airlock's pages under ``/services/airlock/``: requests, review, download. Signed in through the hub.

The pages are the service kit's (:mod:`paitient.services.kit.pages`): the hub's OAuth says who the user is
and which airlock scopes their token carries (``custom:airlock:request``, ``...:review``, ``...:download``);
every page requires the access scope of the service, and :class:`paitient.services.airlock.core.Airlock`
decides what each user may see and do. Pages are Jinja templates extending the kit's base (escaped), forms
carry the hub's XSRF token, and a strict Content-Security-Policy allows no script at all.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jupyterhub.services.auth import HubOAuth
from tornado import web

from paitient.rules import review
from paitient.rules.disclosure import TableError, read_table
from paitient.services.airlock.checks import image_type
from paitient.services.airlock.core import Airlock
from paitient.services.airlock.settings import SCOPE_REQUEST, SCOPE_REVIEW
from paitient.services.airlock.store import StoreError
from paitient.services.kit import pages

HERE = Path(__file__).parent
PREFIX = "/services/airlock/"
ACCESS_SCOPE = "access:services!service=airlock"
PREVIEW_ROWS = 20
PREVIEW_COLUMNS = 30
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
        reqs, reviewable = await self.run(self._listing, self.username, self.scopes)
        self.render_page(
            "list.html",
            requests=reqs,
            reviewable=reviewable,
            can_request=SCOPE_REQUEST in self.scopes,
            can_review=SCOPE_REVIEW in self.scopes,
        )

    def _listing(self, username: str, scopes: set[str]):
        return self.airlock.visible(username, scopes), set(self.airlock.steward_projects(username, scopes))


class DetailHandler(AirlockHandler):
    async def get(self, rid: str) -> None:
        self.render_page("detail.html", **await self.run(self._detail, rid, self.username, self.scopes))

    def _detail(self, rid: str, username: str, scopes: set[str]) -> dict[str, Any]:
        req = self._load(rid, username, scopes)
        airlock = self.airlock
        is_reviewer = airlock.may_review(username, scopes, req)
        info = airlock.describe(req, for_steward=is_reviewer)
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
        return dict(
            req=req,
            info=info,
            events=airlock.store.events(rid),
            record=record,
            flagged=flagged,
            preview=_preview(airlock, req) if airlock.may_preview(username, scopes, req) else None,
            is_reviewer=is_reviewer,
            is_requester=req.username == username,
            can_decide=is_reviewer and req.username != username and req.state == review.IN_REVIEW,
            can_download=airlock.may_download(username, scopes, req),
            approvals_needed=airlock.site.project(req.project).approvals,
        )


class DecisionHandler(AirlockHandler):
    async def post(self, rid: str) -> None:
        await self.load(rid)
        action = self.get_body_argument("action", "")
        comment = self.get_body_argument("comment", "")
        try:
            await self.run(
                self.airlock.decide, rid, username=self.username, scopes=self.scopes, action=action, comment=comment
            )
        except review.TransitionError as e:
            raise web.HTTPError(e.status, str(e)) from None
        self.redirect(f"{self.prefix}requests/{rid}", status=303)


class DownloadHandler(AirlockHandler):
    async def get(self, rid: str) -> None:
        try:
            req, data = await self.run(
                self.airlock.download,
                rid,
                username=self.username,
                scopes=self.scopes,
                client=self.request.remote_ip or "",
            )
        except StoreError:
            raise web.HTTPError(404, f"there is no airlock request {rid}") from None
        except PermissionError as e:
            raise web.HTTPError(403, str(e)) from None
        except Exception:
            self.airlock.log.exception("download of %s refused: no audit record", rid)
            raise web.HTTPError(
                503,
                "the download could not be recorded in the audit trail, so it is refused; ask the workspace operator",
            ) from None
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header("Content-Disposition", f"attachment; filename*=UTF-8''{quote(req.filename)}")
        self.set_header("X-Airlock-SHA256", req.sha256)
        self.finish(data)


class PreviewImageHandler(AirlockHandler):
    async def get(self, rid: str) -> None:
        mime, data = await self.run(self._image, rid, self.username, self.scopes)
        self.set_header("Content-Type", mime)
        self.finish(data)

    def _image(self, rid: str, username: str, scopes: set[str]) -> tuple[str, bytes]:
        req = self._load(rid, username, scopes)
        if not self.airlock.may_preview(username, scopes, req):
            raise web.HTTPError(403, "only the requester and the project's stewards see previews")
        data = self.airlock.store.read_blob(req.sha256)
        mime = image_type(data)
        if mime is None:
            raise web.HTTPError(404, "this output is not a PNG, JPEG or GIF image")
        return mime, data


class ApiListHandler(AirlockHandler):
    async def get(self) -> None:
        reqs = await self.run(self.airlock.visible, self.username, self.scopes)
        self.write_json({"requests": [r.public() for r in reqs]})


class ApiDetailHandler(AirlockHandler):
    async def get(self, rid: str) -> None:
        self.write_json(await self.run(self._info, rid, self.username, self.scopes))

    def _info(self, rid: str, username: str, scopes: set[str]) -> dict[str, Any]:
        req = self._load(rid, username, scopes)
        return self.airlock.describe(req, for_steward=self.airlock.may_review(username, scopes, req))


def _preview(airlock: Airlock, req) -> dict[str, Any] | None:
    data = airlock.store.read_blob(req.sha256)
    if req.kind == "table":
        try:
            df = read_table(data, req.filename)
        except TableError as e:
            return {"error": str(e)}
        head = df.iloc[:PREVIEW_ROWS, :PREVIEW_COLUMNS]
        return {
            "columns": [str(c) for c in head.columns],
            "rows": [[str(v) for v in row] for row in head.itertuples(index=False)],
            "total_rows": len(df),
            "total_columns": len(df.columns),
        }
    if image_type(data):
        return {"image": True}
    return None


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
        (f"requests/{ID_RE}/download", DownloadHandler),
        (f"requests/{ID_RE}/preview", PreviewImageHandler),
        ("api/requests", ApiListHandler),
        (f"api/requests/{ID_RE}", ApiDetailHandler),
    ]
    return pages.make_app(
        routes,
        service="airlock",
        prefix=prefix,
        template_dir=HERE / "templates",
        hub_auth=hub_auth,
        cookie_secret=cookie_secret,
        airlock=airlock,
        **extra,
    )
