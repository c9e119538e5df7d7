"""With ``[workspace] subdomain_host``, the hub's pages on the hub's own host only.

The proxy sends every host it has no route for to the hub, and JupyterHub answers on any host: so
``alice.HOST/hub/login`` was the hub's real sign-in form, on alice's origin. A steward who signed in there
left the hub's cookies with alice's origin, and a page of alice's server could then read the hub's pages
and mint an API token with his scopes (security model, 17b). JupyterHub routes every host to itself on
purpose, for the one thing it does there: answering ``/user/<name>/...`` of a server that is not running
(it sends the browser on to the hub's host).

:func:`install` puts one rule before all of JupyterHub's: on a host below the hub's domain, a request for
anything but ``<base_url>user/`` is sent to the same path on the hub's host (GET and HEAD) or refused (404).
Requests that name no such host (the servers' and services' calls to the hub's API on loopback, the
proxy's error pages) are JupyterHub's as before.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from tornado import httputil, web
from tornado.routing import Matcher, Rule


class BelowTheHubsDomain(Matcher):
    """A request to a host below ``domain`` (``alice.HOST``, ``airlock--service.HOST``) for a path outside
    ``user_prefix``."""

    def __init__(self, domain: str, user_prefix: str):
        self.suffix = "." + domain.lower()
        self.user_prefix = user_prefix

    def match(self, request: httputil.HTTPServerRequest) -> dict[str, Any] | None:
        host = request.host_name.lower()
        if host.endswith(self.suffix) and not request.path.startswith(self.user_prefix):
            return {}
        return None


class ToTheHubsHost(web.RequestHandler):
    """Send a browser on to the same path on the hub's host; refuse anything but a page request."""

    def initialize(self, hub_origin: str) -> None:
        self.hub_origin = hub_origin

    def get(self) -> None:
        uri = self.request.uri or "/"
        if not uri.startswith("/") or uri.startswith("//"):
            # a request line in absolute form, or a path that reads as a host: the hub's origin followed by
            # it (``https://HOST`` + ``@elsewhere/``) would name another host
            raise web.HTTPError(404)
        self.redirect(self.hub_origin + uri)

    def head(self) -> None:
        self.get()

    def check_xsrf_cookie(self) -> None:
        """Nothing to protect: every request but a page's is refused in :meth:`prepare`."""

    def prepare(self) -> None:
        self.set_header("Cache-Control", "no-store")
        if self.request.method not in ("GET", "HEAD"):
            raise web.HTTPError(404)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(f"{status_code}: the hub answers at {self.hub_origin}/ only\n")


def install(app: web.Application, subdomain_host: str, base_url: str = "/") -> None:
    """Put the rule before every route of ``app`` (JupyterHub's tornado application)."""
    domain = urlsplit(subdomain_host).hostname or ""
    if not domain:
        raise ValueError(f"no host in subdomain_host {subdomain_host!r}")
    router = app.default_router
    rule = router.process_rule(
        Rule(BelowTheHubsDomain(domain, base_url.rstrip("/") + "/user/"), ToTheHubsHost, {"hub_origin": subdomain_host})
    )
    router.rules.insert(0, rule)
