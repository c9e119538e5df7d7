"""The sandbox launcher: root decides what a kernel mounts, and starts it as the user.

Process: ``paitient service launcher``, started by the hub as a managed service. User: root.
Trusted for: the sandbox of every researcher's kernel. A user's server asks it for "a kernel of this name
with this connection file" (:mod:`paitient.server.provisioner`); it learns who asks from ``SO_PEERCRED``,
reads the registry and the site configuration, builds the bubblewrap command itself
(:mod:`paitient.rules.sandbox`) and starts the kernel as the user, with exactly the groups of the user's
projects and the workspace's group (its sockets). The request names nothing else: a field for mounts,
environment, capabilities or a command is refused.

On Kubernetes the same launcher runs inside each user's pod, as the user (:mod:`.pod`); what the two
share, the request and the sandbox, is :mod:`.base`.
"""

from __future__ import annotations

from pathlib import Path

from paitient.config import SiteConfig


def socket_path(site: SiteConfig) -> Path:
    """``<state_dir>/gate/launcher.sock``: beside the egress gate's, in a folder no kernel sandbox binds, so
    only users' servers reach it (a kernel cannot ask for more kernels)."""
    return site.state_dir / "gate" / "launcher.sock"
