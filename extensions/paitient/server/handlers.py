"""Handlers that close the export paths a stock server offers."""

from __future__ import annotations

from jupyter_server.auth.decorator import allow_unauthenticated
from jupyter_server.base.handlers import APIHandler
from jupyter_server.services.events.handlers import SubscribeWebsocket

MESSAGE = (
    "Downloads and exports are disabled in this workspace. Files leave only through the airlock: "
    "from paitient import airlock; airlock.request(path, ...)"
)

# URL patterns (below the server's base URL) answered with 403 whatever the method.
BLOCKED = (
    r"/files/(.*)",
    r"/view/(.*)",
    r"/nbconvert/(.*)",
    r"/api/nbconvert(.*)",
)


class BlockedHandler(APIHandler):
    """Answers 403 with a JSON reason for every method."""

    def _refuse(self, *args: str) -> None:
        self.set_status(403)
        self.set_header("Content-Type", "application/json")
        self.finish({"message": MESSAGE, "reason": "export-disabled"})

    async def prepare(self, *, _redirect_to_login: bool = True) -> None:
        # refuse before authentication, XSRF or anything else runs
        self._refuse()

    # Never reached (prepare finished the request); marked so the server knows the route is deliberate.
    get = post = put = patch = delete = head = allow_unauthenticated(_refuse)  # type: ignore[assignment]


class BlockedFilesHandler(BlockedHandler):
    """``ContentsManager.files_handler_class``: the /files/ route itself refuses."""

    def initialize(self, **kwargs: object) -> None:
        pass


class SilentEventsWebsocket(SubscribeWebsocket):
    """The server's event stream (``/api/events/subscribe``), answered with a socket that carries no event.

    The events name what the server did (each file saved or renamed, with its path), so none is sent. A
    refusal is not the answer either: JupyterLab subscribes when it loads and, while its tab is visible,
    subscribes again each time its socket is refused or closes (backing off to 30 s), each attempt a new
    connection through the proxy. So an authenticated, authorised subscriber (the stock handler's checks)
    gets a socket that stays open and silent: no listener is added to the server's event bus, and what the
    browser sends on it is dropped.
    """

    def open(self) -> None:  # type: ignore[override]
        pass

    def on_message(self, message: str | bytes) -> None:
        pass

    def on_close(self) -> None:
        pass
