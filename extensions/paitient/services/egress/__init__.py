"""The egress service: what may reach each researcher's browser, and the record of what did.

Process: ``paitient service egress``, started by the hub as a managed service. User: root.
Trusted for: deciding what leaves for the browser. Every user's server asks it before it sends any piece
of output (:mod:`paitient.server.gate`); it matches the piece against the exact-data-match indexes of the
user's projects (:mod:`.matcher`), counts rows and bytes against the user's day (:mod:`.store`), answers
forward or withhold (:mod:`.service`), and records what left in the audit trail.
"""

from __future__ import annotations

from pathlib import Path

from paitient.config import SiteConfig


def socket_path(site: SiteConfig) -> Path:
    """The gate's socket: ``<state_dir>/gate/egress.sock``, a folder no kernel sandbox binds, so only users'
    servers reach it."""
    return site.state_dir / "gate" / "egress.sock"
