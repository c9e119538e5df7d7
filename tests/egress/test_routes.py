"""Every route of the user's server is gated or refused: a route nobody classified fails here.

The server is built in this process from the configuration the spawner writes (the paitient extension with
JupyterLab), then its application's routing table is walked. A handler a later extension or upgrade adds
without a decision in :data:`paitient.server.routes.POLICY` fails this test by name, and is refused at
request time meanwhile.
"""

from __future__ import annotations

import os

import pytest
from jupyter_server.serverapp import ServerApp
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine
from traitlets.config import Config

from paitient.config import parse
from paitient.hub.serverconfig import server_config
from paitient.registry import Member
from paitient.server import routes
from paitient.server.gate import EgressTransform
from paitient.server.handlers import BlockedHandler


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    home, data_dir, state = root / "home", root / "data", root / "state"
    for d in (home, data_dir / "kernels", state):
        d.mkdir(parents=True)
    site = parse(
        {
            "workspace": {"state_dir": str(root / "site")},
            "projects": [{"name": "onc", "group": "cn=onc", "datasets": ["bc"]}],
        }
    )
    member = Member("alice", "alice", os.getuid(), ("onc",))
    raw = server_config(site, member, str(home), str(data_dir), str(state))
    raw["ServerApp"].update(allow_root=True, open_browser=False)
    app = ServerApp(config=Config(raw))
    app.initialize(argv=[], find_extensions=False, new_httpserver=False)
    return app


def test_the_server_is_locked_down_with_the_gate(built):
    from paitient.server.app import lockdown_problems

    assert lockdown_problems(built) == []
    assert built.web_app.transforms[0] is EgressTransform


def test_every_route_is_classified(built):
    table = routes.routes(built.web_app)
    assert len(table) > 40  # the whole server, JupyterLab included
    unknown = [(pattern, routes.class_name(cls)) for pattern, cls in table if routes.category(cls) is None]
    assert unknown == [], "routes without an egress decision (add them to paitient.server.routes.POLICY)"


def test_the_kernel_and_contents_routes_are_the_gated_ones(built):
    kinds = {routes.class_name(cls): routes.category(cls) for _, cls in routes.routes(built.web_app)}
    assert kinds["jupyter_server.services.kernels.websocket.KernelWebsocketHandler"] == routes.KERNEL
    assert kinds["jupyter_server.services.contents.handlers.ContentsHandler"] == routes.CONTENTS
    refused = {name for name, kind in kinds.items() if kind == routes.REFUSED}
    assert {
        "jupyter_server.view.handlers.ViewHandler",
        "jupyter_server.nbconvert.handlers.NbconvertFileHandler",
        "jupyter_server.services.events.handlers.SubscribeWebsocket",
    } <= refused


def _request(method: str, path: str) -> HTTPServerRequest:
    return HTTPServerRequest(
        headers=HTTPHeaders({"Host": "127.0.0.1"}), start_line=RequestStartLine(method, path, "HTTP/1.1")
    )


def test_a_handler_nobody_classified_is_refused_at_request_time(built):
    from tornado import web

    class Unclassified(web.RequestHandler):
        def get(self) -> None:
            self.finish("data")

    built.web_app.add_handlers(".*$", [(r"/new-extension/route", Unclassified)])
    delegate = built.web_app.find_handler(_request("GET", "/new-extension/route"))
    assert delegate.handler_class is BlockedHandler


@pytest.mark.parametrize(
    "method,path,passthrough",
    [
        ("GET", "/api/contents/notes.txt", True),
        ("PUT", "/api/contents/notes.txt", False),
        ("GET", "/api/sessions", False),
        ("GET", "/lab/api/settings", True),
        ("GET", "/static/lab/main.js", True),
        ("GET", "/files/notes.txt", True),
        ("GET", "/lab", False),
    ],
)
def test_requests_are_tagged_for_the_output_transform(built, method, path, passthrough):
    request = _request(method, path)
    built.web_app.find_handler(request)
    assert request._paitient_passthrough is passthrough
