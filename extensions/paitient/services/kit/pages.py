"""The one way the root-side services serve web pages.

- Sign-in through the hub's OAuth, one :class:`~jupyterhub.services.auth.HubOAuth` per application shared by
  the pages and the OAuth callback (it keeps the login states and their PKCE verifiers); every
  :class:`ScopedPage` names the hub scope it requires, and nobody without it gets past :meth:`ScopedPage.prepare`.
- Jinja2 templates with autoescape on, every template extending ``kit/base.html`` (header, navigation between
  the services' pages, one stylesheet); no page carries script and the Content-Security-Policy allows none.
- Errors answer JSON (``{"error", "status"}``) under ``<prefix>api/`` and an escaped HTML page elsewhere, never
  a traceback; unknown paths get the same 404 page.
- :class:`WebThread` runs an application on loopback in a thread, beside a service's socket server.
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import secrets
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlencode, urlparse

from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler, HubOAuthenticated, check_scopes
from tornado import web

from paitient.services.kit.render import base_namespace, environment, render

HERE = Path(__file__).parent
SERVICES = HERE.parent
"""The services' packages; each one's page templates are in its ``templates/`` folder."""
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def error_message(status_code: int, reason: str, exc: BaseException | None) -> str:
    """What an error page says: an HTTPError's own message, else only the status's reason (no internals)."""
    if isinstance(exc, web.HTTPError) and exc.log_message:
        try:
            return exc.log_message % exc.args if exc.args else exc.log_message
        except (TypeError, ValueError):
            return exc.log_message
    if status_code >= 500:
        return f"{reason}: the service could not answer; its log has the details"
    return reason


class BasePage(web.RequestHandler):
    """Headers, templates and errors of every page; no sign-in (see :class:`ScopedPage`)."""

    def set_default_headers(self) -> None:
        for name, value in SECURITY_HEADERS.items():
            self.set_header(name, value)

    @property
    def prefix(self) -> str:
        return self.settings["paitient_prefix"]

    @property
    def is_api(self) -> bool:
        return self.request.path.startswith(self.prefix + "api/")

    def known_user(self) -> dict[str, Any] | None:
        """The signed-in user if this request already asked the hub (an error page asks nothing more)."""
        return getattr(self, "_current_user", None)

    def template_namespace(self) -> dict[str, Any]:
        """What every template sees; subclasses add their own helpers."""
        return base_namespace(
            service=self.settings["paitient_service"],
            prefix=self.prefix,
            user=self.known_user(),
            hub_prefix=self.settings["paitient_hub_auth"].hub_prefix,
            hub_host=self.settings["paitient_hub_auth"].hub_host,
            static_url=self.static_url,
            xsrf_form_html=self.xsrf_form_html,
        )

    def render_template(self, template: str, **values: Any) -> str:
        return render(self.settings["paitient_templates"], template, self.template_namespace(), **values)

    def render_page(self, template: str, **values: Any) -> None:
        """Answer the HTML of ``template`` (it extends ``kit/base.html``)."""
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(self.render_template(template, **values))

    def write_json(self, value: Any) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(value, default=str))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = error_message(status_code, self._reason, exc)
        if self.is_api:
            self.write_json({"error": message, "status": status_code})
            return
        try:
            page = self.render_template("kit/error.html", status=status_code, message=message)
        except Exception:  # the error page itself failed: a plain line, still escaped
            self.log_exception(*sys.exc_info())
            page = f"<!doctype html><p>{html.escape(str(status_code))}: {html.escape(message)}</p>"
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(page)


class ScopedPage(HubOAuthenticated, BasePage):
    """Signed in through the hub and holding :attr:`required_scope`; anyone else is refused before any handler.

    Anonymous visitors of a page go to the hub's login; the API (``<prefix>api/``) and other methods answer
    403 instead of redirecting. The hub checks the scope when it names the user (``hub_scopes``), and
    :meth:`prepare` checks it again, so a page cannot be served without it.
    """

    required_scope: ClassVar[str] = ""
    needed_for: ClassVar[str] = "this page"

    def initialize(self) -> None:
        self.hub_auth = self.settings["paitient_hub_auth"]

    @property
    def hub_scopes(self) -> set[str]:
        return {self.required_scope}

    def get_current_user(self) -> dict[str, Any] | None:
        """JupyterHub's, except that a look from inside its own look sees nobody yet.

        A request whose XSRF cookie was made for another sign-in (a second session's, or one a page of a
        sibling origin set) has JupyterHub make a new cookie, and to choose its lifetime it asks who the user
        is: from inside the call that is finding out, on the one thread that call holds. That thread then
        waited on itself and the service answered nobody again."""
        if getattr(self, "_paitient_asking_hub", False):
            return None
        self._paitient_asking_hub = True
        try:
            return super().get_current_user()
        finally:
            self._paitient_asking_hub = False

    def get_login_url(self) -> str:
        if self.is_api:
            raise web.HTTPError(403, f"{self.needed_for} needs a hub token with the {self.required_scope} scope")
        return super().get_login_url()

    def prepare(self) -> None:
        user = self.current_user
        if user is None:
            if self.request.method in ("GET", "HEAD") and not self.is_api:
                url = self.get_login_url()
                if "?" not in url:
                    url += "?" + urlencode({"next": self.request.uri})
                self.redirect(url)  # the hub's handler turns this into 403 for a user it did not allow
                return
            raise web.HTTPError(
                403, f"{self.needed_for} needs signing in through the hub with the {self.required_scope} scope"
            )
        if not check_scopes({self.required_scope}, set(user.get("scopes", ()))):
            raise web.HTTPError(403, f"{self.needed_for} needs the {self.required_scope} scope")

    @property
    def username(self) -> str:
        """The signed-in user's name (:meth:`prepare` has refused everyone else)."""
        return self.current_user["name"]

    @property
    def scopes(self) -> set[str]:
        return set(self.current_user.get("scopes", ()))

    async def blocking(self, fn, *args: Any) -> Any:
        """Run a blocking call (a store, the filesystem) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


class NotFoundPage(BasePage):
    """Any path no route matches: the same escaped 404 page (or JSON under the API)."""

    def prepare(self) -> None:
        raise web.HTTPError(404, "there is no such page here")


class OAuthCallback(HubOAuthCallbackHandler, BasePage):
    """The hub's OAuth callback with the application's HubOAuth: the one that stored the login's state."""

    def initialize(self) -> None:
        self.hub_auth = self.settings["paitient_hub_auth"]


def make_app(
    routes: Iterable[tuple[str, type[web.RequestHandler]]],
    *,
    service: str,
    prefix: str,
    template_dir: str | os.PathLike[str] | None = None,
    hub_auth: HubOAuth | None = None,
    cookie_secret: bytes | None = None,
    **settings: Any,
) -> web.Application:
    """An application for ``routes`` (paths relative to ``prefix``) plus the OAuth callback and static files.

    ``template_dir`` defaults to the service package's ``templates/`` folder (``services/<service>/templates``);
    ``hub_auth`` defaults to a HubOAuth configured from the hub's environment for this service.
    Every :class:`ScopedPage` route must name its :attr:`~ScopedPage.required_scope`.
    """
    prefix = "/" + prefix.strip("/") + "/" if prefix.strip("/") else "/"
    handlers: list[tuple[str, type[web.RequestHandler]]] = []
    for path, handler in routes:
        if issubclass(handler, ScopedPage) and not handler.required_scope:
            raise ValueError(f"{handler.__name__} names no required_scope; every page of a service needs one")
        handlers.append((prefix + path.lstrip("/"), handler))
    handlers.append((prefix + "oauth_callback", OAuthCallback))
    if hub_auth is None:
        hub_auth = HubOAuth(api_token=os.environ.get("JUPYTERHUB_API_TOKEN", ""), cache_max_age=60)
    return web.Application(
        handlers,
        paitient_hub_auth=hub_auth,
        paitient_prefix=prefix,
        paitient_service=service,
        paitient_templates=environment(SERVICES / service / "templates" if template_dir is None else template_dir),
        static_path=str(HERE / "static"),
        static_url_prefix=prefix + "static/",
        default_handler_class=NotFoundPage,
        cookie_secret=cookie_secret or secrets.token_bytes(32),
        xsrf_cookies=True,
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


LISTEN_ENV = "PAITIENT_SERVICE_LISTEN"
"""Set by ``paitient service NAME --separate --listen=ADDRESS``: the address the pages bind, where the proxy is
not on this machine (the services' pod on Kubernetes). Their URL stays loopback's; its port is taken."""


def serve_pages(app: web.Application, url: str, what: str, log: Any) -> WebThread:
    """Serve ``app`` at ``url`` (the hub's ``JUPYTERHUB_SERVICE_URL``) on loopback, in a thread; at the port of
    ``url`` on the address :data:`LISTEN_ENV` names, where the operator named one."""
    host, port = loopback_listener(url, what)
    host = os.environ.get(LISTEN_ENV) or host
    log.info("%s on %s (prefix %s)", what, url, app.settings["paitient_prefix"])
    return WebThread(app, host, port, name=app.settings["paitient_service"]).start()
