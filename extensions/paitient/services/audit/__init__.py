"""The audit trail: who signed in, ran what, and took what out, in a hash chain written by root only.

Root-side processes (hub, services, ingest) call :func:`emit`; users' servers and kernels call
:func:`paitient.server.audit.send`, and the audit service (``paitient service audit``) records the event
under the name the kernel vouches for (``SO_PEERCRED``). ``paitient audit verify`` checks the chain.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Unpack

from paitient.rules.records import AuditError, Event, RecordError

__all__ = ["AuditError", "RecordError", "config_details", "emit", "emit_many", "trail_dir", "trail_writer"]


def trail_dir(site) -> Path:
    """Where the trail of ``site`` lives: ``<state_dir>/audit``."""
    return Path(site.state_dir) / "audit"


def emit(site, **event: Unpack[Event]) -> dict[str, Any]:
    """Append one record to the site's trail (flushed and fsync'd) and return it.

    ``actor`` is the username the event is about (or ``"system"``), ``action`` a dotted name such as
    ``airlock.decision``, ``object`` what it acted on (``"<project>/<dataset>"``, a request id, ...),
    ``outcome`` one of ``ok``, ``denied``, ``error``. Put the project in ``details["project"]`` when
    there is one: ``paitient audit show --project`` filters on it.

    Raises :class:`RecordError` for a malformed event and :class:`AuditError` when the trail cannot be
    written; both are loud on purpose: the caller decides whether to go on without a record.
    """
    log = _log_for(str(site.state_dir), site.audit.rotate_bytes)
    return log.append(**event)


def emit_many(site, events: list[Event]) -> list[dict[str, Any]]:
    """:func:`emit` of several records at once: one lock and one fsync for them all, all or none written."""
    log = _log_for(str(site.state_dir), site.audit.rotate_bytes)
    return log.append_many([dict(e) for e in events])


def trail_writer(site, emit: Callable[..., Any] | None = None) -> Callable[[list[Event]], Any]:
    """How a service writes its records: with ``emit(**record)``, one by one, where one is given (a stand-in
    trail of a test), else :func:`emit_many` to the site's trail."""
    if emit is None:
        return functools.partial(emit_many, site)
    given = emit

    def one_by_one(events: list[Event]) -> None:
        for event in events:
            given(**event)

    return one_by_one


def config_details(site) -> dict[str, Any]:
    """Details for the ``config.effective`` record written at start: the whole validated site
    configuration (it holds no secrets, only paths to them) and its SHA-256, so two starts compare."""
    config = json.loads(json.dumps(site.to_dict(), default=str))
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return {"source": site.source or "(embedded demo default)", "sha256": digest, "config": config}


@functools.lru_cache(maxsize=16)
def _log_for(state_dir: str, rotate_bytes: int):
    from paitient.services.audit.writer import AuditLog

    return AuditLog(Path(state_dir) / "audit", rotate_bytes=rotate_bytes)
