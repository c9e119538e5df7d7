"""Handlers that close the export paths a stock server offers."""

from __future__ import annotations

from jupyter_server.auth.decorator import allow_unauthenticated
from jupyter_server.base.handlers import APIHandler

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
