"""A service's pages in tests: its metrics registry's text, parsed back, and its application on a loopback
port, signed in through test headers."""

from __future__ import annotations

from jupyterhub.services.auth import HubOAuth
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from paitient.services.kit.metrics import exposition


def text(registry) -> str:
    """What the service's metrics page answers (the Prometheus text format)."""
    return exposition(registry).decode()


def samples(registry) -> dict[tuple[str, frozenset], float]:
    """Every sample of the registry's text: (name, labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text(registry)):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(registry, name: str, **labels: str) -> float:
    """One sample's value, 0.0 when the registry has no such sample (a counter never incremented)."""
    return samples(registry).get((name, frozenset(labels.items())), 0.0)


class HeaderHubAuth(HubOAuth):
    """The real HubOAuth, except that the signed-in user comes from test headers instead of the hub's API: the
    scope check on them is HubOAuthenticated's own."""

    def get_user(self, handler, *, sync=True):
        name = handler.request.headers.get("X-Test-User")
        if not name:
            return None
        scopes = handler.request.headers.get("X-Test-Scopes", "").split()
        return {"name": name, "kind": "user", "scopes": scopes, "groups": []}


def header_auth(prefix: str, service: str = "test") -> HeaderHubAuth:
    return HeaderHubAuth(
        api_token="test-token",
        api_url="http://127.0.0.1:1/hub/api",
        oauth_client_id=f"service-{service}",
        login_url="/hub/api/oauth2/authorize",
        base_url=prefix,
        hub_prefix="/hub/",
    )


class Served:
    """An application on a loopback port; :meth:`get` fetches a path under ``prefix`` as a user with scopes."""

    def __init__(self, app, prefix: str):
        sock, self.port = bind_unused_port("127.0.0.1")
        self.server = HTTPServer(app)
        self.server.add_sockets([sock])
        self.prefix = prefix
        self.client = AsyncHTTPClient(force_instance=True)

    async def get(self, path: str, user: str | None = "op", scopes=()):
        headers = {"X-Test-User": user, "X-Test-Scopes": " ".join(scopes)} if user else {}
        return await self.client.fetch(
            f"http://127.0.0.1:{self.port}{self.prefix}{path}",
            headers=headers,
            follow_redirects=False,
            raise_error=False,
        )

    def as_user(self, user: str, scopes: str):
        """``get(path="", user=user, scopes=scopes)``: a fetch as ``user`` by default, ``scopes`` space-separated
        (``user=None``: not signed in)."""

        async def get(path: str = "", user: str | None = user, scopes: str = scopes):
            return await self.get(path, user, scopes.split())

        return get

    def close(self) -> None:
        self.client.close()
        self.server.stop()
