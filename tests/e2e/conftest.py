"""End-to-end fixtures: one real workspace (directory, proxy, hub, services) shared by the e2e tests."""

import pytest

from tests.e2e.workspace import own_workspace


@pytest.fixture(scope="session")
def workspace():
    with own_workspace("paitient-e2e-") as ws:
        yield ws


@pytest.fixture
def fresh_workspace():
    """A workspace of its own, for tests that stop or break parts of it; the test calls .start()."""
    with own_workspace("paitient-e2e-own-", "ptu", start=False) as ws:
        yield ws
