"""Every route of the user's server is gated or refused: a route nobody classified fails here.

The server is built in this process as the user's server process builds it: JupyterHub's single-user
application with the configuration the spawner writes and every extension the environment enables
(JupyterLab, notebook_shim, the paitient extension, JupyterHub's own). Its application's routing table is
then walked. A handler a later extension or upgrade adds without a decision in
:data:`paitient.server.routes.POLICY` fails this test by name, and is refused at request time meanwhile.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import threading

import jupyterhub
import pytest
from jupyterhub.singleuser.extension import JupyterHubSingleUser
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine
from traitlets.config import Config

from paitient.config import parse
from paitient.hub.serverconfig import server_config
from paitient.registry import Member
from paitient.server import routes
from paitient.server.gate import IF_OK, EgressTransform
from paitient.server.handlers import BlockedHandler, SilentEventsWebsocket


class _HubVersion(http.server.BaseHTTPRequestHandler):
    """The one question the single-user application asks its hub while it starts: the hub's version."""

    def do_GET(self) -> None:
        body = json.dumps({"version": jupyterhub.__version__}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def hub_api():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubVersion)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hub/api"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def built(tmp_path_factory, hub_api):
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
    hub_env = {
        "JUPYTERHUB_API_TOKEN": "t" * 32,
        "JUPYTERHUB_API_URL": hub_api,
        "JUPYTERHUB_CLIENT_ID": "jupyterhub-user-alice",
        "JUPYTERHUB_USER": "alice",
        "JUPYTERHUB_BASE_URL": "/",
        "JUPYTERHUB_SERVICE_PREFIX": "/user/alice/",
        "JUPYTERHUB_OAUTH_CALLBACK_URL": "/user/alice/oauth_callback",
        "JUPYTERHUB_SERVICE_URL": "http://127.0.0.1:0/user/alice/",
    }
    with pytest.MonkeyPatch.context() as mp:
        for name, value in hub_env.items():
            mp.setenv(name, value)
        app = JupyterHubSingleUser.initialize_server(argv=[], config=Config(raw), new_httpserver=False)
    return app


def test_the_walk_is_of_the_server_the_user_gets(built):
    """The extensions of a real user's server are all loaded here, so their routes are all walked."""
    assert {"jupyterhub", "jupyterlab", "notebook_shim", "paitient.server"} <= set(built.extension_manager.extensions)
    enabled = {name for name, ext in built.extension_manager.extensions.items() if ext.enabled}
    assert {"jupyterhub", "jupyterlab", "notebook_shim", "paitient.server"} <= enabled
    assert not {"jupyter_server_terminals", "jupyter_lsp"} & enabled


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
    } <= refused
    assert kinds["jupyter_server.services.events.handlers.SubscribeWebsocket"] == routes.SILENT


def _request(method: str, path: str, **headers: str) -> HTTPServerRequest:
    return HTTPServerRequest(
        headers=HTTPHeaders({"Host": "127.0.0.1", **headers}), start_line=RequestStartLine(method, path, "HTTP/1.1")
    )


def test_a_handler_nobody_classified_is_refused_at_request_time(built):
    from tornado import web

    class Unclassified(web.RequestHandler):
        def get(self) -> None:
            self.finish("data")

    built.web_app.add_handlers(".*$", [(built.base_url + r"new-extension/route", Unclassified)])
    delegate = built.web_app.find_handler(_request("GET", built.base_url + "new-extension/route"))
    assert delegate.handler_class is BlockedHandler


_GROUPS = ((r"(.*)", "nb.ipynb"), (r"(?P<format>\w+)", "html"), (r"(?P<path>(?:(?:/[^/]+)+|/?))", "/nb.ipynb"))


def _a_path_of(pattern: str) -> str:
    """A URL the route's pattern matches."""
    path = pattern.removesuffix("$")
    for group, value in (
        (r"(.*)", "nb.ipynb"),
        (r"(?P<format>\w+)", "html"),
        (r"(?P<path>(?:(?:/[^/]+)+|/?))", "/nb.ipynb"),
    ):
        path = path.replace(group, value)
    assert re.fullmatch(pattern, path), (pattern, path)
    return path


def test_every_route_classified_refused_is_answered_by_the_refusal(built):
    """Not only the URLs a pattern of handlers.BLOCKED covers: the stock handler of a refused route never runs
    (before, /view, /lab/api/build and the event stream's websocket ran theirs)."""
    refused = [(p, cls) for p, cls in routes.routes(built.web_app) if routes.category(cls) == routes.REFUSED]
    assert {routes.class_name(cls) for _, cls in refused} >= {
        "jupyterlab.handlers.build_handler.BuildHandler",
        "jupyter_server.view.handlers.ViewHandler",
    }
    for pattern, _ in refused:
        for method in ("GET", "POST"):
            delegate = built.web_app.find_handler(_request(method, _a_path_of(pattern)))
            assert issubclass(delegate.handler_class, BlockedHandler), (method, pattern, delegate.handler_class)
    for path in ("view", "view/", "lab/api/build"):
        delegate = built.web_app.find_handler(_request("GET", built.base_url + path))
        assert delegate.handler_class is BlockedHandler, path


def test_the_event_streams_route_is_answered_by_the_silent_socket(built):
    """The stock subscriber, which adds a listener to the server's event bus, never runs."""
    silent = [(p, cls) for p, cls in routes.routes(built.web_app) if routes.category(cls) == routes.SILENT]
    assert {routes.class_name(cls) for _, cls in silent} == {
        "jupyter_server.services.events.handlers.SubscribeWebsocket"
    }
    for pattern, _ in silent:
        delegate = built.web_app.find_handler(_request("GET", _a_path_of(pattern)))
        assert delegate.handler_class is SilentEventsWebsocket, (pattern, delegate.handler_class)
    request = _request("GET", built.base_url + "api/events/subscribe")
    assert built.web_app.find_handler(request).handler_class is SilentEventsWebsocket
    assert request._paitient_passthrough is True


@pytest.mark.parametrize(
    "method,path,passthrough",
    [
        # a contents GET with content: the manager checked a 200's body; the transform checks anything else
        ("GET", "/api/contents/notes.txt", IF_OK),
        ("GET", "/api/contents/notes.txt?content=1", IF_OK),
        ("GET", "/api/contents/notes.txt?content=1&content=0", False),
        ("GET", "/api/contents/notes.txt?content=0", False),
        ("PUT", "/api/contents/notes.txt", False),
        ("GET", "/api/sessions", False),
        ("GET", "/lab/api/settings", True),
        ("GET", "/static/lab/main.js", True),
        ("GET", "/files/notes.txt", True),
        ("GET", "/lab", False),
    ],
)
def test_requests_are_tagged_for_the_output_transform(built, method, path, passthrough):
    request = _request(method, built.base_url.rstrip("/") + path, **{"If-None-Match": '"abc"'})
    built.web_app.find_handler(request)
    assert request._paitient_passthrough == passthrough
    # a checked request asks no 304 (an answer on the hash of a body before the gate read it)
    assert ("If-None-Match" in request.headers) == bool(passthrough)


def test_a_removed_kernels_output_cap_is_let_go(built):
    """Each kernel's output cap (the headers of its latest requests among it) stayed as long as the server."""
    gate = built.web_app.settings["paitient_gate"]
    manager = built.kernel_manager
    kernel_id = "0b7c1f9e-2f4c-4a51-9a3e-5d2f8c6b1a70"
    cap = gate.cap(kernel_id, 1000, 1000)
    cap.note_request({"msg_id": "m1", "msg_type": "execute_request", "session": "s"})
    manager._kernels[kernel_id] = object()  # as a started kernel is kept, until it is shut down
    manager.remove_kernel(kernel_id)
    assert kernel_id not in manager._kernels
    assert gate.cap(kernel_id, 1000, 1000) is not cap and gate.cap(kernel_id, 1000, 1000).requests == {}
    gate.forget_kernel(kernel_id)
