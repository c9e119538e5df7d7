"""Fixtures for the privacy ledger: a site with two projects in a temp state dir, the service on a real socket."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paitient.config import parse
from paitient.registry import Member, Registry
from paitient.services.ledger.service import LedgerService
from paitient.services.ledger.store import Ledger
from tests import rootmember
from tests.postgres import database_toml

PY = sys.executable

SITE_TOML = """
[workspace]
state_dir = "{state_dir}"

[[projects]]
name = "oncology"
group = "oncology"
datasets = ["breast_cancer", "gbsg2"]
stewards = ["sam"]
budget = {{ epsilon = 10.0, delta = 1e-5 }}
budgets = {{ gbsg2 = {{ epsilon = 2.0, delta = 1e-6 }} }}

[[projects]]
name = "cardio"
group = "cardio"
datasets = ["diabetes"]
stewards = ["sam"]
budget = {{ epsilon = 5.0, delta = 1e-5 }}
"""


def make_site(state_dir: Path, database: dict[str, str] | None = None):
    """The test site in ``state_dir``; ``database``: its ``[database]`` table (None or empty: SQLite)."""
    import tomllib

    text = SITE_TOML.format(state_dir=state_dir) + database_toml(database or {})
    (state_dir / "site.toml").write_text(text)
    return parse(tomllib.loads(text), source=str(state_dir / "site.toml"))


def register(state_dir: Path, username: str, uid: int, projects: tuple[str, ...], roles=("researcher",)) -> Member:
    member = Member(username=username, account=f"pt-{username}", uid=uid, projects=projects, roles=roles)
    rootmember.put(Registry.for_state_dir(state_dir), member)
    return member


@pytest.fixture
def state_dir(world_tmp) -> Path:
    d = world_tmp / "state"
    d.mkdir()
    os.chmod(d, 0o755)
    return d


@pytest.fixture
def site(state_dir, database):
    """The test site, once with the ledger in SQLite and once in PostgreSQL (``database``, tests/conftest.py)."""
    return make_site(state_dir, database)


@pytest.fixture
def ledger(site):
    ledger = Ledger(site)
    yield ledger
    ledger.close()


@pytest.fixture
def service(site, ledger):
    """The ledger's operations on the real socket, served from a thread of the test process."""
    from paitient.services.kit.channel import ChannelServer
    from paitient.services.kit.process import socket_path

    svc = LedgerService(site, ledger, Registry.for_state_dir(site.state_dir), logging.getLogger("test-ledger"))
    server = ChannelServer(socket_path(site, "ledger"), svc.handlers(), name="ledger")
    server.start_in_thread()
    yield svc
    server.shutdown()
    server.server_close()


def start_service_process(site, *, log_path: Path) -> subprocess.Popen:
    """``paitient service ledger`` as its own process, as the hub runs it; waits for the socket."""
    sock = site.run_dir / "ledger.sock"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [PY, "-m", "paitient.cli", "service", "ledger", f"--site={site.source}", f"--state-dir={site.state_dir}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "JUPYTERHUB_SERVICE_URL": ""},
        )
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"ledger service did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.05)
    return proc
