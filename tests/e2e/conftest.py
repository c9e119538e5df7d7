"""End-to-end fixtures: one real workspace (directory, proxy, hub, services) shared by the e2e tests."""

import json

import pytest

from tests import groups
from tests.e2e.workspace import own_workspace


@pytest.fixture(scope="session")
def workspace():
    with own_workspace("paitient-e2e-") as ws:
        # its groups are made in whichever test or module first asks for it; they live as long as it does
        record = ws.state_dir / "project-groups.json"
        kept = set(json.loads(record.read_text())) if record.exists() else set()
        groups.KEPT.update(kept)
        try:
            yield ws
        finally:
            groups.KEPT.difference_update(kept)


@pytest.fixture
def fresh_workspace():
    """A workspace of its own, for tests that stop or break parts of it; the test calls .start()."""
    with own_workspace("paitient-e2e-own-", "ptu", start=False) as ws:
        yield ws
