"""paitient.server: the Jupyter server extension of the user's server (see :mod:`paitient.server.app`)."""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from paitient.server.app import PaitientServerExtension

    return [{"module": "paitient.server.app", "app": PaitientServerExtension}]
