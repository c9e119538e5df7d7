"""The rule that keeps the hub's pages on the hub's host, on a real tornado server."""

from __future__ import annotations

import asyncio

from tornado import web
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from paitient.hub.hosts import install


class Hub(web.RequestHandler):
    def get(self) -> None:
        self.write("the hub's page")


async def _ask(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await reader.read(4096)
    writer.close()
    return answer


async def test_a_page_below_the_hubs_domain_is_sent_to_the_same_path_on_the_hubs_host_and_nowhere_else():
    """A browser asks ``alice.hub.example/hub/login``: it is sent to ``https://hub.example/hub/login``. A
    request line in absolute form (``GET http://x@elsewhere/``), or a path that reads as a host (``//elsewhere``),
    put after the hub's origin, named another host (``https://hub.example@elsewhere/``): refused now."""
    app = web.Application([(r".*", Hub)])
    install(app, "https://hub.example", "/")
    server = HTTPServer(app)
    sock, port = bind_unused_port()
    server.add_sockets([sock])
    try:
        host = b"Host: alice.hub.example\r\nConnection: close\r\n\r\n"
        page = await _ask(port, b"GET /hub/login?next=%2Fhub%2F HTTP/1.1\r\n" + host)
        assert page.startswith(b"HTTP/1.1 302") and b"Location: https://hub.example/hub/login?next=%2Fhub%2F" in page
        for target in (b"http://x@elsewhere.example/", b"//elsewhere.example/"):
            answer = await _ask(port, b"GET " + target + b" HTTP/1.1\r\n" + host)
            assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
            assert b"elsewhere" not in answer.split(b"\r\n\r\n")[0]
        own = await _ask(port, b"GET /hub/login HTTP/1.1\r\nHost: hub.example\r\nConnection: close\r\n\r\n")
        assert own.startswith(b"HTTP/1.1 200") and own.endswith(b"the hub's page")
    finally:
        server.stop()
