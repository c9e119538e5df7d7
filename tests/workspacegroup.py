"""The workspace's group in tests: the default ``[accounts] group``, which the services' sockets belong to.

Test accounts that stand in for workspace members are put in it (``make_system_user``), and code run as
another uid with ``setpriv`` keeps it with :func:`setpriv_groups`, as a member's server and kernels do. The
session removes the group at its end when it did not exist before (``tests/conftest.py``).
"""

from __future__ import annotations

import grp
import subprocess

GROUP = "paitient-users"


def gid() -> int:
    """The group's gid, made (as the services make it) if it does not exist yet."""
    try:
        return grp.getgrnam(GROUP).gr_gid
    except KeyError:
        subprocess.run(["groupadd", "--system", GROUP], capture_output=True, check=False)
        return grp.getgrnam(GROUP).gr_gid


def exists() -> bool:
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        return False
    return True


def setpriv_groups() -> str:
    """The ``setpriv`` option giving a process only the workspace's group as supplementary group."""
    return f"--groups={gid()}"
