"""The airlock's pages under ``/services/airlock/``: requests, review, download. Signed in through the hub.

Every handler is a :class:`jupyterhub.services.auth.HubOAuthenticated` tornado handler: the hub's OAuth
says who the user is and which airlock scopes their token carries (``custom:airlock:request``,
``...:review``, ``...:download``); :class:`paitient.services.airlock.service.Airlock` decides what each user may
see and do. Pages are server-rendered tornado templates (autoescaped), forms carry the hub's XSRF token,
and a strict Content-Security-Policy allows no script at all.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler, HubOAuthenticated
from tornado import web

from paitient.rules import review
from paitient.rules.disclosure import TableError, read_table
from paitient.services.airlock.checks import image_type
from paitient.services.airlock.core import Airlock
from paitient.services.airlock.settings import SCOPE_REQUEST, SCOPE_REVIEW
from paitient.services.airlock.store import StoreError

HERE = Path(__file__).parent
PREVIEW_ROWS = 20
PREVIEW_COLUMNS = 30
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
ID_RE = r"([0-9]{8}-[0-9a-f]{8})"


class AirlockHandler(HubOAuthenticated, web.RequestHandler):
    """Base: the hub's OAuth for identity, the airlock for permissions, blocking work off the event loop."""

    def initialize(self) -> None:
        self.airlock: Airlock = self.settings["airlock"]
        self.hub_auth = self.settings["hub_auth"]

    def set_default_headers(self) -> None:
        self.set_header("Content-Security-Policy", CSP)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("Cache-Control", "no-store")

    @property
    def username(self) -> str:
        return self.current_user["name"]

    @property
    def scopes(self) -> set[str]:
        return set(self.current_user.get("scopes", ()))

    async def run(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(None, partial(fn, *args, **kwargs))

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

    def get_template_namespace(self) -> dict[str, Any]:
        ns = super().get_template_namespace()
        ns.update(
            prefix=self.settings["airlock_prefix"],
            user=self.current_user,
            json=json,
            label=lambda s: s.replace("_", " "),
            when=lambda ts: time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)),
        )
        return ns

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        message = self._reason
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        if self.request.path.startswith(self.settings["airlock_prefix"] + "api/"):
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"error": message, "status": status_code}))
            return
        self.render("error.html", status=status_code, message=message)


class OAuthCallbackHandler(HubOAuthCallbackHandler):
    """The hub's OAuth callback, using the same HubOAuth as the pages: it holds the OAuth states (and their
    PKCE verifiers) that the pages' login redirects created."""

    def initialize(self) -> None:
        self.hub_auth = self.settings["hub_auth"]


class ListHandler(AirlockHandler):
    @web.authenticated
    async def get(self) -> None:
        reqs, reviewable = await self.run(self._listing, self.username, self.scopes)
        self.render(
            "list.html",
            requests=reqs,
            reviewable=reviewable,
            can_request=SCOPE_REQUEST in self.scopes,
            can_review=SCOPE_REVIEW in self.scopes,
        )

    def _listing(self, username: str, scopes: set[str]):
        return self.airlock.visible(username, scopes), set(self.airlock.steward_projects(username, scopes))


class DetailHandler(AirlockHandler):
    @web.authenticated
    async def get(self, rid: str) -> None:
        self.render("detail.html", **await self.run(self._detail, rid, self.username, self.scopes))

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
    @web.authenticated
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
        self.redirect(f"{self.settings['airlock_prefix']}requests/{rid}", status=303)


class DownloadHandler(AirlockHandler):
    @web.authenticated
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
    @web.authenticated
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
    @web.authenticated
    async def get(self) -> None:
        reqs = await self.run(self.airlock.visible, self.username, self.scopes)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"requests": [r.public() for r in reqs]}))


class ApiDetailHandler(AirlockHandler):
    @web.authenticated
    async def get(self, rid: str) -> None:
        info = await self.run(self._info, rid, self.username, self.scopes)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(info, default=str))

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
    prefix: str = "/services/airlock/",
    hub_auth: HubOAuth | None = None,
    cookie_secret: bytes | None = None,
    **extra: Any,
) -> web.Application:
    """The tornado application; ``hub_auth`` defaults to the hub's OAuth configured from the service env."""
    prefix = "/" + prefix.strip("/") + "/"
    if hub_auth is None:
        hub_auth = HubOAuth(api_token=os.environ.get("JUPYTERHUB_API_TOKEN", ""), cache_max_age=60)
    handlers = [
        (prefix, ListHandler),
        (prefix + "oauth_callback", OAuthCallbackHandler),
        (prefix + f"requests/{ID_RE}", DetailHandler),
        (prefix + f"requests/{ID_RE}/decision", DecisionHandler),
        (prefix + f"requests/{ID_RE}/download", DownloadHandler),
        (prefix + f"requests/{ID_RE}/preview", PreviewImageHandler),
        (prefix + "api/requests", ApiListHandler),
        (prefix + f"api/requests/{ID_RE}", ApiDetailHandler),
    ]
    return web.Application(
        handlers,
        airlock=airlock,
        hub_auth=hub_auth,
        airlock_prefix=prefix,
        template_path=str(HERE / "templates"),
        static_path=str(HERE / "static"),
        static_url_prefix=prefix + "static/",
        cookie_secret=cookie_secret or secrets.token_bytes(32),
        xsrf_cookies=True,
        login_url=prefix,
        **extra,
    )
