"""Who a reader of the stewards' pages (ledger, egress, audit trail) is, and what those pages show them.

A steward reads the projects that name them in ``stewards`` and the researchers who are members of those
projects; an admin reads everything. Nobody reads what they did themselves: a steward who is also a
researcher would otherwise read back, in a browser outside the gate, what their own kernel wrote into a
ledger run or an audit record (:mod:`paitient.services.audit.web`, :mod:`paitient.services.ledger.web`).
As nobody reviews their own airlock request, another steward or an admin reads those records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

OWN_RECORD = (
    "a record of your own activity: another steward or an admin reads it (your server and kernels can write "
    "into it, so it is not shown to you)"
)
"""What stands in place of a record's content when its reader is the one it is about."""


@dataclass(frozen=True)
class Reader:
    """One signed-in reader of the stewards' pages."""

    username: str
    projects: tuple[str, ...]
    """The projects they steward, in the site's order (every project for an admin)."""
    members: frozenset[str] | None
    """The users of those projects; ``None`` for an admin (everyone)."""

    @classmethod
    def of(cls, site: Any, registry: Any, username: str) -> Reader:
        member = registry.by_username(username)
        if member is not None and "admin" in member.roles:
            return cls(username, tuple(p.name for p in site.projects), None)
        projects = tuple(p.name for p in site.projects if username in p.stewards)
        users = frozenset(m.username for m in registry.all() if set(projects) & set(m.projects))
        return cls(username, projects, users)

    @property
    def admin(self) -> bool:
        return self.members is None

    def reads_user(self, user: str) -> bool:
        """Whether the reader sees what ``user`` did (not their own doing: see :meth:`is_self`)."""
        return self.members is None or user in self.members

    def is_self(self, user: Any) -> bool:
        return isinstance(user, str) and user == self.username
