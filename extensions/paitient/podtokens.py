"""The tokens of users' Kubernetes pods: who a call through the services' gateway is made for.

The hub mints one token per spawn of a user's pod (:func:`mint`), hands it to the pod (a Secret the pod's
``kernels`` container mounts, where the pod's relay reads it; no kernel's sandbox binds it), and revokes it
when the pod stops (:func:`revoke`). The gateway (:mod:`paitient.services.gateway`) looks each call's token
up (:class:`PodTokens`) and speaks to the services for the user it names.

Only a token's SHA-256 is kept, in one JSON file, root's, 0640 with the gateway's group (``<state_dir>/
pod-tokens.json``; the gateway reads it and cannot change it): whoever reads it learns who has a pod, not
how to act as one. A token is 32 random bytes (URL-safe base64);
a user has at most one live token: minting another revokes the one before (a pod that was replaced).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from paitient.fsutil import atomic_write_json, locked

FILE = "pod-tokens.json"
MAX_TOKEN = 256


@dataclass(frozen=True)
class PodIdentity:
    """The user a pod's token stands for: the name, the pod's uid and the pod's id (not secret)."""

    user: str
    uid: int
    pod: str


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_file(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / FILE


def _read(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict[str, dict], group: int | None) -> None:
    atomic_write_json(path, data, mode=0o600 if group is None else 0o640)
    if group is not None:
        os.chown(path, -1, group)


def mint(path: str | os.PathLike[str], user: str, uid: int, *, group: int | None = None) -> tuple[str, PodIdentity]:
    """A new token for ``user``'s pod (running as ``uid``, never root); the user's earlier token is revoked.
    ``group``: the gateway's group, which may read the file (None: root only)."""
    if uid <= 0:
        raise ValueError(f"{user}: a pod's uid must not be root, got {uid}")
    path = Path(path)
    token = secrets.token_urlsafe(32)
    who = PodIdentity(user=user, uid=uid, pod=secrets.token_hex(8))
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.with_suffix(".lock")):
        data = {h: v for h, v in _read(path).items() if v.get("user") != user}
        data[digest(token)] = {"user": who.user, "uid": who.uid, "pod": who.pod}
        _write(path, data, group)
    return token, who


def revoke(path: str | os.PathLike[str], user: str, *, group: int | None = None) -> bool:
    """Revoke ``user``'s pod token (the pod stopped); True when there was one."""
    path = Path(path)
    with locked(path.with_suffix(".lock")):
        data = _read(path)
        kept = {h: v for h, v in data.items() if v.get("user") != user}
        if len(kept) == len(data):
            return False
        _write(path, kept, group)
    return True


class PodTokens:
    """The gateway's view of the token file, read again whenever it changes."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None
        self._known: dict[str, PodIdentity] = {}

    def lookup(self, token: object) -> PodIdentity | None:
        """The pod ``token`` stands for; None for no token, a malformed one, an unknown or a revoked one."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN:
            return None
        try:
            st = os.stat(self.path)
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            key = (0, 0, 0)
        with self._lock:
            if key != self._seen:
                known = {}
                for h, v in _read(self.path).items():
                    try:
                        known[h] = PodIdentity(user=str(v["user"]), uid=int(v["uid"]), pod=str(v["pod"]))
                    except (KeyError, TypeError, ValueError):
                        continue
                self._known, self._seen = known, key
            found = self._known.get(digest(token))
        return found if found is not None and found.uid > 0 else None
