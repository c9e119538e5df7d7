"""Groups a test or a benchmark made on this machine, removed at its end so that none is left behind.

Publishing a dataset makes a system group per project (``<prefix>proj-<project>``,
:mod:`paitient.services.data.access`), and the services make the workspace's group (:mod:`tests.workspacegroup`)
when it is missing.
"""

from __future__ import annotations

import grp
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from tests import workspacegroup

PROJECT_GROUP = re.compile(r"^[a-z][a-z0-9-]{0,7}proj-")


def project_groups() -> set[str]:
    return {g.gr_name for g in grp.getgrall() if PROJECT_GROUP.match(g.gr_name)}


KEPT: set[str] = set()
"""Project groups of a workspace that outlives the test or module that happened to start it (the session's
shared e2e workspace): its own teardown removes them, no block that ends before it."""


@contextmanager
def made_groups_removed(workspace: bool = False) -> Iterator[None]:
    """Every project group made inside the block is deleted at its end (but those in :data:`KEPT`); with
    ``workspace``, the workspace's group too when the block made it."""
    before, had_workspace = project_groups(), workspacegroup.exists()
    try:
        yield
    finally:
        for name in sorted(project_groups() - before - KEPT):
            subprocess.run(["groupdel", name], capture_output=True)
        if workspace and not had_workspace and workspacegroup.exists():
            subprocess.run(["groupdel", workspacegroup.GROUP], capture_output=True)
