"""What the services' read-only web pages share: hub sign-in with one scope, safe headers, JSON or HTML
errors, and a loopback listener on its own thread (the service's socket server keeps the main thread)."""

from __future__ import annotations

import asyncio
import html
import json
import secrets
import threading
from typing import Any, ClassVar
from urllib.parse import urlparse

from jupyterhub.services.auth import HubOAuthenticated
from tornado import web

CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"


class ScopedPage(HubOAuthenticated, web.RequestHandler):
    """Signed in through the hub and holding :attr:`required_scope`; anyone else gets 403.

    Errors answer JSON under ``/api/`` and a short escaped HTML line elsewhere, never a traceback.
    """

    required_scope: ClassVar[str] = ""
    needed_for: ClassVar[str] = "this page"

    def initialize(self) -> None:
        # The app may carry its own HubAuth (one per app instead of the process-wide singleton).
        if self.settings.get("paitient_hub_auth") is not None:
            self.hub_auth = self.settings["paitient_hub_auth"]

    @property
    def hub_scopes(self) -> set[str]:
        return {self.required_scope}

    def set_default_headers(self) -> None:
        self.set_header("Content-Security-Policy", CSP)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("Cache-Control", "no-store")

    def signed_in(self) -> str:
        """The signed-in user's name, or 403 when nobody is or the scope is missing."""
        user = self.current_user
        if not user:
            raise web.HTTPError(403)
        if self.required_scope not in set(user.get("scopes", ())):
            raise web.HTTPError(403, f"{self.needed_for} needs the {self.required_scope} scope")
        return user["name"]

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        reason = self._reason
        exc = kwargs.get("exc_info", (None, None))[1]
        if isinstance(exc, web.HTTPError) and exc.log_message:
            reason = exc.log_message
        if "/api/" in self.request.path:
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"error": reason, "status": status_code}))
        else:
            self.finish(f"<!doctype html><p>{html.escape(str(status_code))}: {html.escape(str(reason))}</p>")


def make_app(routes: list[tuple[str, type]], *, hub_auth=None, **settings: Any) -> web.Application:
    """An application for ``routes``; ``hub_auth`` defaults to the HubOAuth configured from the hub's env."""
    return web.Application(
        routes,
        paitient_hub_auth=hub_auth,
        cookie_secret=settings.pop("cookie_secret", None) or secrets.token_bytes(32),
        **settings,
    )


class WebThread:
    """A tornado application on its own event loop in a thread."""

    def __init__(self, app: web.Application, host: str, port: int, name: str = "web"):
        self.app, self.host, self.port = app, host, port
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"{name}-web", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.app.listen(self.port, address=self.host)
        self.ready.set()
        try:
            self.loop.run_forever()
        finally:
            server.stop()
            self.loop.close()

    def start(self) -> WebThread:
        self.thread.start()
        self.ready.wait(10)
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def loopback_listener(url: str, what: str) -> tuple[str, int]:
    """Host and port of ``url`` (the hub's ``JUPYTERHUB_SERVICE_URL``); only loopback addresses are taken."""
    parsed = urlparse(url)
    host = parsed.hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"{what} listens on loopback only, not {host!r}; set its url to http://127.0.0.1:PORT")
    return host, parsed.port or 80
