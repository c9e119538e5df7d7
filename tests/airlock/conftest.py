"""Fixtures for the airlock: a site with three projects, registered accounts, a real store, ledger and trail."""

from __future__ import annotations

import logging

import pytest
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from paitient.config import parse
from paitient.registry import Registry
from paitient.services.airlock.service import Airlock, AirlockSettings
from paitient.services.airlock.web import make_app
from paitient.services.kit.channel import ChannelServer
from paitient.services.kit.process import socket_path
from paitient.services.ledger.service import LedgerService
from paitient.services.ledger.store import Ledger
from tests.airlock.helpers import PREFIX, Client, known_user_auth, register

STAGES = ["stage", "I", "II", "III", "IV"]
"""Labels the test tables use that no catalogue lists (the projects' allow-list)."""

SITE = {
    "workspace": {"state_dir": "/placeholder"},
    "projects": [
        {
            "name": "oncology",
            "group": "oncology",
            "datasets": ["breast_cancer"],
            "stewards": ["sam", "steph"],
            "approvals": 1,
            "self_reported_weights": "two-person",
            "self_reported_reason": "in-kernel models are compared with certified ones for the methods paper",
            "budget": {"epsilon": 5.0, "delta": 1e-5},
            "table_labels": STAGES,
        },
        {
            "name": "cardio",
            "group": "cardio",
            "datasets": ["diabetes"],
            "stewards": ["sam", "steph"],
            "approvals": 2,
            "table_labels": STAGES,
        },
        {
            "name": "registry",
            "group": "registry",
            "datasets": ["counts"],
            "stewards": ["sam"],
            "auto_release": ["table"],
            "table_labels": STAGES,
        },
    ],
}


@pytest.fixture
def site(world_tmp, database):
    """The airlock's site, once with its stores in SQLite and once in PostgreSQL (``database``)."""
    state = world_tmp / "state"
    state.mkdir(mode=0o755)
    return parse({**SITE, "database": database}, overrides={"workspace": {"state_dir": str(state)}})


@pytest.fixture
def registry(site):
    return Registry.for_state_dir(site.state_dir)


@pytest.fixture
def ledger_service(site):
    """The privacy ledger's operations on its real socket, as ``paitient service ledger`` serves them."""
    svc = LedgerService(site, Ledger(site), Registry.for_state_dir(site.state_dir), logging.getLogger("test-ledger"))
    srv = ChannelServer(socket_path(site, "ledger"), svc.handlers(), name="ledger")
    srv.start_in_thread()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def airlock(site, ledger_service):
    """An Airlock with its check worker running, the real audit trail and the real privacy ledger (asked over
    its socket, as the service does)."""
    a = Airlock(site, settings=AirlockSettings(audit_timeout=300))
    a.start()
    yield a
    a.stop()


@pytest.fixture
def channel(site, airlock):
    srv = ChannelServer(site.run_dir / "airlock.sock", airlock.handlers(), name="airlock")
    srv.start_in_thread()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def people(registry):
    """Registered users of the web tests (the uids need no system account there)."""
    register(registry, "alice", 30001, projects=["oncology"])
    register(registry, "carol", 30002, projects=["oncology", "cardio"])
    register(registry, "bob", 30003, projects=["cardio"])
    register(registry, "dave", 30004, projects=["oncology"])
    register(registry, "steph", 30005, projects=["oncology", "registry"], roles=("researcher", "steward"))
    register(registry, "sam", 30006, roles=("steward",))
    register(registry, "rita", 30007, roles=("steward",))
    register(registry, "ren", 30008, projects=["registry"])
    register(registry, "ada", 30009, roles=("steward", "admin"))
    return registry


@pytest.fixture
async def web(airlock, people):
    """The pages on a loopback port, the user of each request chosen by a test cookie."""
    server = HTTPServer(make_app(airlock, prefix=PREFIX, hub_auth=known_user_auth()))
    sock, port = bind_unused_port()
    server.add_sockets([sock])
    yield Client(f"http://127.0.0.1:{port}")
    server.stop()
    await server.close_all_connections()
