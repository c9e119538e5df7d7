"""Contents manager confined to the home: symlinks and ``..`` are resolved before the root check."""

from __future__ import annotations

import os

from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
from tornado.web import HTTPError


def inside(root: str, path: str) -> bool:
    """True if ``path``, with every symlink resolved, lies in ``root`` (also resolved)."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


class ConfinedContentsManager(AsyncLargeFileManager):
    """The stock manager checks the unresolved path only; a symlink in the home could reach anything the
    user's account can read on the host (other projects' data, service state). This one refuses that."""

    def _get_os_path(self, path: str) -> str:
        os_path = super()._get_os_path(path)
        if not inside(self.root_dir, os_path):
            raise HTTPError(404, f"{path} is outside the home folder")
        return os_path
