"""A published demo site with its ledger and jobs sockets served in this process, for the runner's tests."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from paitient.config import load
from paitient.ops.demodata import publish_demo
from paitient.registry import Member, Registry
from paitient.services.jobs.runner import Runner
from paitient.services.jobs.service import JobsService
from paitient.services.jobs.store import JobStore
from paitient.services.kit.channel import ChannelServer
from paitient.services.kit.process import socket_path
from paitient.services.ledger.service import LedgerService
from paitient.services.ledger.store import Ledger
from tests import rootmember


@dataclass
class JobsWorld:
    site: Any
    registry: Registry
    ledger: Ledger
    store: JobStore
    runner: Runner
    servers: list[ChannelServer] = field(default_factory=list)

    def serve(self, path: Any, handlers: Any) -> None:
        server = ChannelServer(path, handlers)
        server.start_in_thread()
        self.servers.append(server)


@contextmanager
def jobs_world(state_dir: Any, account: str, monkeypatch: Any) -> Iterator[JobsWorld]:
    """The demo data published under ``state_dir``; alice a researcher of oncology (this process, root, stands
    in for her server); the ledger and the jobs service on their sockets; a runner made, not started, whose
    workers run as ``account``. Everything is stopped at the end."""
    site = load(None, overrides={"workspace": {"state_dir": str(state_dir)}, "jobs": {"account": account}})
    publish_demo(site)
    registry = Registry.for_state_dir(site.state_dir)
    rootmember.put(registry, Member("alice", "root", 0, ("oncology",), ("researcher",)))
    store = JobStore(site.state_dir)
    wake = threading.Event()
    world = JobsWorld(site, registry, Ledger(site), store, Runner(site, store, registry, wake=wake))
    try:
        world.serve(
            socket_path(site, "ledger"), LedgerService(site, world.ledger, registry, logging.getLogger("t")).handlers()
        )
        world.serve(socket_path(site, "jobs"), JobsService(site, store, registry, wake=wake).handlers())
        monkeypatch.setenv("PAITIENT_RUN_DIR", str(site.run_dir))
        yield world
    finally:
        world.runner.stop()
        for server in world.servers:
            server.shutdown()
            server.server_close()
        store.close()
