"""The hub's audit records on their way to the trail.

What must be recorded before it happens (a sign-in) is written at once, after any record still waiting,
and does not happen when the trail cannot take it. What needs no record first (a refused sign-in, a refused
API token, a revoked one) must not go unrecorded either: when the trail cannot take it, it waits in a
:class:`~paitient.services.kit.backlog.Backlog`, held in ``<state_dir>/hub/held-records.jsonl`` (root 0600),
and is written before the hub's next record, or at the hub's next start, each saying when it happened.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Unpack

from prometheus_client.metrics_core import Metric

from paitient.rules.records import AuditError, Event
from paitient.services import audit
from paitient.services.kit.backlog import Backlog, HeldFile

__all__ = ["HeldFile", "backlog", "held_path", "record", "register_metrics"]

log = logging.getLogger("paitient.hub.records")


def held_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / "hub" / "held-records.jsonl"


_backlogs: dict[str, Backlog] = {}
_backlogs_lock = threading.Lock()


def backlog(site: Any) -> Backlog:
    """The hub's records waiting for the trail: one per state directory (its held file has one writer), for
    the hub's whole process."""
    state_dir = str(site.state_dir)
    with _backlogs_lock:
        if state_dir not in _backlogs:
            _backlogs[state_dir] = Backlog(HeldFile(held_path(state_dir)), audit.trail_writer(site), log, "hub")
        return _backlogs[state_dir]


def record(site: Any, *, required: bool = False, **event: Unpack[Event]) -> bool:
    """Blocking: write one record of the hub. ``required``: the action waits on it; the records still waiting
    go first, and :class:`AuditError` is raised when the trail takes none. Otherwise False when the trail
    refused it: it waits, held, for the trail."""
    if not required:
        return backlog(site).write([event])
    waiting = backlog(site)
    if not waiting.flush():
        raise AuditError(f"the audit trail cannot be written: {waiting.last_error}")
    audit.emit(site, **event)
    return True


def register_metrics(site: Any) -> None:
    """Add ``paitient_hub_records_waiting`` to what the hub's ``/hub/metrics`` answers (prometheus_client's
    default registry, which JupyterHub serves)."""
    from prometheus_client import REGISTRY

    from paitient.services.kit.metrics import Reading, gauge

    def read() -> Iterator[Metric]:
        yield gauge(
            "paitient_hub_records_waiting",
            "The hub's audit records the trail has not taken yet, held in <state_dir>/hub/held-records.jsonl",
            (),
            [((), backlog(site).waiting)],
        )

    REGISTRY.register(Reading(read))
