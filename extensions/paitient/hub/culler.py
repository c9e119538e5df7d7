"""The hub's idle culler: jupyterhub-idle-culler as a hub-managed service, from ``[server] cull_timeout``.

The culler asks the hub's API for users and their servers' last activity and stops a server idle longer than
the timeout (``DELETE /users/NAME/server``), exactly as ``paitient up`` stops servers on shutdown: the spawner
interrupts the server, which shuts its kernels down, and each kernel's keeper
(:mod:`paitient.services.launcher.keeper`) ends the kernel if the server goes without doing so. It never
removes users or their homes.

Its role holds the four scopes the culler documents and nothing more: it can read who has a server and when it
was last used, and stop it; it cannot start servers, read tokens, act as a user or reach a service.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from paitient.config import SiteConfig

CULLER_SERVICE = "idle-culler"
CULLER_SCOPES = ("list:users", "read:users:activity", "read:servers", "delete:servers")
"""What jupyterhub-idle-culler needs to stop idle servers (``admin:users`` only for ``--cull-users``, unused)."""


def cull_every(timeout: int) -> int:
    """How often the culler looks: a quarter of the timeout, between 15 seconds and 5 minutes."""
    return max(15, min(300, timeout // 4))


DIE_WITH_HUB = ["/usr/bin/setpriv", "--pdeathsig=TERM", "--"]
"""The prefix that gives a third-party service the hub's death as its SIGTERM (``PR_SET_PDEATHSIG``)."""


def culler_service(site: SiteConfig, python: str, cwd: Path) -> dict[str, Any] | None:
    """The ``c.JupyterHub.services`` entry of the culler, or None when ``[server] cull_timeout`` is 0.

    It runs from ``cwd`` (root-owned, the hub's own folder) with ``python -I``, and with no configuration file:
    the culler would otherwise import from and execute ``idle_culler_config.py`` in whatever folder the hub was
    started from, as root.
    """
    timeout = site.server.cull_timeout
    if not timeout:
        return None
    return {
        "name": CULLER_SERVICE,
        # SIGTERM when the hub ends, however it ends: the hub stops its managed services only when it stops
        # cleanly, and a culler left behind would go on polling a hub that is gone (the services of paitient's
        # own do the same for themselves, paitient.services.kit.process.die_with_parent)
        "command": [
            *DIE_WITH_HUB,
            python,
            "-I",
            "-m",
            "jupyterhub_idle_culler",
            f"--timeout={timeout}",
            f"--cull-every={cull_every(timeout)}",
            "--config=",
        ],
        "cwd": str(cwd),
        "display": False,
        "info": {"description": f"Stops researchers' servers idle for {timeout} s ([server] cull_timeout)"},
    }


def culler_role() -> dict[str, Any]:
    """The role of the culler's service (for ``c.JupyterHub.load_roles``)."""
    return {
        "name": CULLER_SERVICE,
        "description": "Stops idle servers ([server] cull_timeout); nothing else",
        "scopes": list(CULLER_SCOPES),
        "services": [CULLER_SERVICE],
    }
