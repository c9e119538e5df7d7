"""paitient: a secure analysis workspace for clinical AI research.

Researchers' code comes to the data: sandboxed JupyterLab kernels on pseudonymised data, differentially
private training with a per-project privacy budget, and an airlock as the only way out.

The package is laid out by trust zone; a module's path says which process runs it, as which user, and
what it may be trusted for (CONTRIBUTING.md has the map):

- ``paitient.kernel``: inside the sandboxed kernel, as the researcher; untrusted.
- ``paitient.server``: the researcher's single-user server, as the researcher.
- ``paitient.hub``: the hub, as root.
- ``paitient.services``: the root-side services (ledger, audit, airlock, data), as root.
- ``paitient.rules``: pure rules with no I/O, importable from every zone.
- ``paitient.ops``: ``paitient up`` and the demo, apart from the product.
- common to all: ``config``, ``registry``, ``catalogue``, ``channel``, ``fsutil``, ``app``, ``cli``.

In a notebook the researcher's modules keep their short names::

    from paitient import data, dp, airlock
"""

from __future__ import annotations

import importlib
from types import ModuleType

__version__ = "0.1.0"

# The researcher's API: short names for modules of the kernel zone, imported on first use so that
# `import paitient` in a root-side process loads nothing of the kernel zone.
RESEARCHER_MODULES = {
    "data": "paitient.kernel.data",
    "dp": "paitient.kernel.dp",
    "airlock": "paitient.kernel.airlock",
    "jobs": "paitient.kernel.jobs",
}

__all__ = ["__version__", *RESEARCHER_MODULES]


def __getattr__(name: str) -> ModuleType:
    target = RESEARCHER_MODULES.get(name)
    if target is None:
        raise AttributeError(f"module 'paitient' has no attribute {name!r}")
    module = importlib.import_module(target)
    globals()[name] = module
    return module
