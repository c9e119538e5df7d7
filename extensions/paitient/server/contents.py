"""Contents manager confined to the home: symlinks and ``..`` are resolved before the root check, and
files larger than the site's contents cap are not opened or sent."""

from __future__ import annotations

import os
from typing import Any

from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
from tornado.web import HTTPError

from paitient.config import Server, site_trait


def inside(root: str, path: str) -> bool:
    """True if ``path``, with every symlink resolved, lies in ``root`` (also resolved)."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


class ConfinedContentsManager(AsyncLargeFileManager):
    """The stock manager checks the unresolved path only; a symlink in the home could reach anything the
    user's account can read on the host (other projects' data, service state). This one refuses that."""

    max_content_bytes = site_trait(Server, "contents_cap_bytes")

    def _get_os_path(self, path: str) -> str:
        os_path = super()._get_os_path(path)
        if not inside(self.root_dir, os_path):
            raise HTTPError(404, f"{path} is outside the home folder")
        return os_path

    async def get(
        self, path: str, content: bool = True, type: str | None = None, format: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        if content:
            os_path = self._get_os_path(path.strip("/"))
            if os.path.isfile(os_path) and os.path.getsize(os_path) > self.max_content_bytes:
                raise HTTPError(
                    403,
                    f"{path} is larger than {self.max_content_bytes:,} bytes and is not opened here. It stays in "
                    "your home: work with it in a notebook, or request an export through the airlock.",
                )
        return await super().get(path, content=content, type=type, format=format, **kwargs)
