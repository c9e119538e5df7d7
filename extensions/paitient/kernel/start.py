"""The kernel process: IPython's kernel (``ipykernel``), started without its debugger.

The workspace's kernel spec turns the debugger off (JupyterLab offers none), yet ipykernel imports debugpy at
start whenever it is installed: about 13 MiB and 0.1 s of CPU in every kernel. Marked absent before ipykernel
is imported, the kernel starts without it and answers debug requests with an empty reply. ``python -I -m
paitient.kernel.start -f CONNECTION_FILE`` takes the arguments of ``ipykernel_launcher``; ``-I`` keeps the
working directory (the researcher's home) off the module path.
"""

from __future__ import annotations

import sys

SKIPPED = ("debugpy",)
"""Modules the kernel never imports (see above)."""


def skip_unneeded() -> None:
    """Mark :data:`SKIPPED` absent (an ``import`` of them raises ImportError) unless already imported."""
    for name in SKIPPED:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def main() -> None:
    skip_unneeded()
    from ipykernel import kernelapp

    kernelapp.launch_new_instance()


if __name__ == "__main__":
    main()
