"""Who held which directory-managed role at their latest sign-in, kept across hub restarts.

The authenticator manages the researcher and steward roles (JupyterHub ``manage_roles``). At start the
hub resets managed role assignments it is not told about, so the authenticator tells it: the holders
recorded here at each sign-in keep their roles through a hub restart, and a sign-in updates them.
"""

from __future__ import annotations

import json
from pathlib import Path

from paitient.fsutil import atomic_write_json, locked


def _path(state_dir: str | Path) -> Path:
    return Path(state_dir) / "hub" / "role_holders.json"


def _read(path: Path) -> dict[str, list[str]]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def record(state_dir: str | Path, username: str, roles: list[str] | tuple[str, ...]) -> None:
    """Remember ``username``'s roles as of this sign-in (replacing what was recorded before)."""
    path = _path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.with_suffix(".lock")):
        data = _read(path)
        data[username] = sorted(set(roles))
        atomic_write_json(path, data, mode=0o600)


def holders(state_dir: str | Path) -> dict[str, list[str]]:
    """role -> usernames holding it."""
    out: dict[str, list[str]] = {}
    for user, roles in sorted(_read(_path(state_dir)).items()):
        for role in roles:
            out.setdefault(role, []).append(user)
    return out
