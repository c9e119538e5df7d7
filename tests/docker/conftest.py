"""A real workspace on the docker spawner: `paitient up --spawner docker` (podman's Docker API under the state
directory, the single-user image made there), the real hub, proxy, directory, services and kernels.

If the engine cannot start, `paitient up` fails and so does every test here, with its reason: nothing is
skipped.
"""

from __future__ import annotations

import docker
import pytest

from paitient.hub.engine import Engine
from tests.e2e.workspace import own_workspace


@pytest.fixture(scope="module")
def docker_ws():
    with own_workspace("ptk-", "ptk", up_args=("--spawner=docker",)) as ws:
        yield ws


@pytest.fixture(scope="module")
def engine(docker_ws) -> docker.APIClient:
    """The engine's API, as the hub reaches it."""
    client = docker.APIClient(base_url=Engine(docker_ws.state_dir).url, version="auto")
    yield client
    client.close()
