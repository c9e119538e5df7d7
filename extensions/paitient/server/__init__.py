"""Zone ``paitient.server``: the user's single-user Jupyter server and what it starts.

Process: ``jupyterhub.singleuser`` (started as :mod:`.singleuser`) with this server extension (:mod:`.app`).
User: the researcher's own system account, outside the kernel sandbox. Configured only from root-owned files
the spawner writes (:mod:`paitient.hub.serverconfig`); the user's home is never read for policy.
Trusted for: enforcing what reaches the browser (downloads refused, contents confined, output caps) and
starting every kernel in the sandbox (:mod:`.provisioner`). Not trusted to decide a release: the user's
own processes share its uid.
"""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from paitient.server.app import PaitientServerExtension

    return [{"module": "paitient.server.app", "app": PaitientServerExtension}]
