"""Who is who: the root-owned record tying system accounts to directory users, projects and roles.

The hub writes it at every sign-in (membership comes from the directory then); the services read it
to turn a caller's uid (from ``SO_PEERCRED``) into a user and the projects that user may act for.
The file lives under the state directory, owned by root, mode 0644: users may read who exists, only
root changes it. No member is root: the hub never writes an entry with uid 0 (the services would take
the hub's and the operator's own calls for that researcher's).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from paitient.fsutil import atomic_write_json, locked


@dataclass(frozen=True)
class Member:
    username: str
    """JupyterHub / directory username."""
    account: str
    """Local system account the user's server and kernels run as."""
    uid: int
    projects: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    """``researcher``, ``steward``, ``admin``."""
    updated: float = field(default_factory=time.time)

    @property
    def is_steward(self) -> bool:
        return "steward" in self.roles


ROOT_UID = 0


class Registry:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    @classmethod
    def for_state_dir(cls, state_dir: str | Path) -> Registry:
        return cls(Path(state_dir) / "accounts.json")

    def _read(self) -> dict[str, dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}

    def all(self) -> list[Member]:
        return [_member(v) for v in self._read().values()]

    def by_username(self, username: str) -> Member | None:
        v = self._read().get(username)
        return _member(v) if v else None

    def by_uid(self, uid: int) -> Member | None:
        for v in self._read().values():
            if v["uid"] == uid:
                return _member(v)
        return None

    def by_account(self, account: str) -> Member | None:
        for v in self._read().values():
            if v["account"] == account:
                return _member(v)
        return None

    def put(self, member: Member) -> None:
        if member.uid == ROOT_UID:
            raise ValueError(
                f"{member.username}: uid 0 is root, which no workspace member may be; give the account its own uid"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with locked(self.lock_path):
            data = self._read()
            data[member.username] = asdict(member)
            atomic_write_json(self.path, data, mode=0o644)

    def remove(self, username: str) -> Member | None:
        """Drop ``username``'s entry (a user retired by the operator); return it, None when there was none."""
        with locked(self.lock_path):
            data = self._read()
            gone = data.pop(username, None)
            if gone is not None:
                atomic_write_json(self.path, data, mode=0o644)
        return _member(gone) if gone else None


def _member(v: dict) -> Member:
    return Member(
        username=v["username"],
        account=v["account"],
        uid=int(v["uid"]),
        projects=tuple(v.get("projects", ())),
        roles=tuple(v.get("roles", ())),
        updated=float(v.get("updated", 0)),
    )
