"""The user's server process: JupyterHub's single-user server (``jupyterhub.singleuser``), started lighter.

jsonschema checks the ``iri`` string format with ``rfc3987_syntax`` whenever that package is installed, and
importing it compiles a grammar: about 0.7 s of CPU and 15 MiB of memory in every user's server, for a format
no schema of the server uses (jupyter_events validates its event schemas with jsonschema). The module is
marked absent before jupyter_server is imported, so jsonschema leaves that one format unchecked; every other
check is unchanged. ``python -I -m paitient.server.singleuser`` takes the arguments of
``jupyterhub-singleuser``.
"""

from __future__ import annotations

import sys

SKIPPED = ("rfc3987_syntax",)
"""Modules the server never imports (see above)."""


def skip_unneeded() -> None:
    """Mark :data:`SKIPPED` absent (an ``import`` of them raises ImportError) unless already imported."""
    for name in SKIPPED:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def main() -> None:
    skip_unneeded()
    from jupyterhub.singleuser import main as singleuser_main

    singleuser_main()


if __name__ == "__main__":
    main()
