"""The audit service: records events from users' servers and kernels under the name their uid vouches for.

Run by ``paitient service audit`` (a JupyterHub managed service, see :func:`hub_service`). It serves
``<run_dir>/audit.sock`` with one operation, ``record``; the actor is never taken from the request but
from the socket's peer credentials via the registry (an unknown uid is recorded as ``uid:<n>``), and the
sender's pid and uid go into the record. User-side processes may report only what happens in their own
server and kernels (:data:`USER_ACTIONS`); nothing that claims a decision, a sign-in, or an airlock step.
With ``JUPYTERHUB_SERVICE_URL`` set (the hub sets it), it also serves the read-only web view there.
"""

from __future__ import annotations

import logging
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

from paitient.channel import BAD_REQUEST, FORBIDDEN, UNAVAILABLE, ChannelError, Peer
from paitient.registry import Registry
from paitient.rules.records import OUTCOMES, AuditError, RecordError, cap_details
from paitient.services.audit import emit, emit_many, trail_dir
from paitient.services.audit.api import READ_SCOPE, custom_scopes, role_scopes
from paitient.services.audit.budget import (
    BUDGET_ACTION,
    STATE_FILE,
    WINDOW_SLOTS,
    ByteBudget,
    details_size,
    object_size,
    over_budget_details,
    over_budget_object,
)
from paitient.services.audit.metrics import AuditMetrics
from paitient.services.audit.query import projects_of
from paitient.services.kit.access import channel_options
from paitient.services.kit.channel import ChannelServer
from paitient.services.kit.process import StopSignal, managed_service, socket_path

__all__ = ["READ_SCOPE", "USER_ACTIONS", "custom_scopes", "handlers", "hub_service", "role_scopes", "serve"]

USER_ACTIONS = frozenset({"cell.execute", "kernel.start", "kernel.stop"})
"""What a user-side process may report. Everything else is recorded by root-side processes only."""

REQUEST_KEYS = frozenset({"action", "object", "outcome", "details"})
MAX_OBJECT_CHARS = 1024
SERVER_ORIGINS = frozenset({"host", "server"})
"""Origins of a user's server (local profile, pod). Only the server sends large details (a cell's code); from
any other origin (a kernel, or a sender gone before it was looked at) details are capped at
``[audit] kernel_details_bytes``."""


def hub_service(site, python: str, *, port: int = 0) -> dict[str, Any]:
    """The JupyterHub managed-service entry (``c.JupyterHub.services``) that runs this service.

    The web view listens on loopback; ``port=0`` picks a free port now (as the hub does for its own).
    """
    return managed_service(
        site,
        "audit",
        python,
        port=port,
        scopes=[READ_SCOPE],
        description="Audit trail (stewards and admins, read-only)",
    )


def peer_origin(peer: Peer) -> str:
    """``host`` if the sender shares the service's pid namespace (a user's server in the local profile),
    ``namespaced`` if it runs in another one (a sandboxed kernel), ``gone`` if it had ended when its
    connection was taken.

    The kernel vouches for the namespace, of the process that connected (:func:`peer_pid_namespace`); the
    sender cannot choose it, so a record reported from inside a sandbox is marked as such even though it
    carries the same uid as the user's server. A pod's caller (through the gateway) is marked by what its pod's
    relay saw instead: ``kernel`` or ``server``.
    """
    same = peer.same_pid_namespace
    return "gone" if same is None else "host" if same else "namespaced"


def user_event(
    actor: str,
    peer: Peer,
    args: dict[str, Any],
    *,
    string_chars: int,
    details_bytes: int,
    origin: str = "",
    projects: tuple[str, ...] = (),
    known_projects: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Turn a ``record`` request into the event to append, or raise :class:`ChannelError` saying why not."""
    unknown = sorted(set(args) - REQUEST_KEYS)
    if unknown:
        raise ChannelError(
            f"unknown field(s) {', '.join(unknown)}; send only {', '.join(sorted(REQUEST_KEYS))} "
            "(the actor comes from your connection)",
            BAD_REQUEST,
        )
    action = args.get("action")
    if action not in USER_ACTIONS:
        raise ChannelError(
            f"action {action!r} may not be reported from a user's server or kernel; "
            f"allowed: {', '.join(sorted(USER_ACTIONS))}",
            FORBIDDEN,
        )
    obj = args.get("object", "")
    outcome = args.get("outcome", "ok")
    details = args.get("details") or {}
    if not isinstance(obj, str):
        raise ChannelError("object must be a string", BAD_REQUEST)
    if outcome not in OUTCOMES:
        raise ChannelError(f"outcome must be one of {', '.join(OUTCOMES)}", BAD_REQUEST)
    if not isinstance(details, dict):
        raise ChannelError("details must be a JSON object", BAD_REQUEST)
    if details.get("user", actor) != actor:  # `audit show --user` matches details.user: no one else's name
        raise ChannelError("details.user may name only yourself (the actor comes from your connection)", BAD_REQUEST)
    # `audit show --project` reads project names from details and object: only the sender's own count
    foreign = (projects_of({"object": obj, "details": details}) & set(known_projects)) - set(projects)
    if foreign:
        raise ChannelError(f"the event names project(s) {', '.join(sorted(foreign))}, which are not yours", FORBIDDEN)
    capped = cap_details(details, string_limit=string_chars, total_limit=details_bytes)
    capped["peer"] = {"pid": peer.pid, "uid": peer.uid, "origin": origin}
    if peer.delegated:  # a pod's caller: the pid is the one its pod's relay sees
        capped["peer"]["pod"] = peer.pod
    return {
        "actor": actor,
        "action": action,
        "object": obj[:MAX_OBJECT_CHARS],
        "outcome": outcome,
        "details": capped,
    }


def budget_for(site) -> ByteBudget:
    """The accounts' daily byte budget of ``site``, kept in ``<state_dir>/audit-budget.json``."""
    return ByteBudget(site.audit.user_daily_bytes, Path(site.state_dir) / STATE_FILE)


def within_budget(event: dict[str, Any], budget: ByteBudget) -> list[dict[str, Any]]:
    """The records to write for a user-side ``event``: the event, its details and object charged to the actor's
    budget or, past it, its details replaced by their length and SHA-256 and a long object cut; before it an
    ``audit.budget`` record the first time in an hour that the account is over. Never refuses: a cell must not
    be refused because of the budget."""
    details = dict(event["details"])
    peer = details.pop("peer", None)
    size, digest = details_size(details)
    fits, used = budget.charge(event["actor"], size + object_size(event["object"]))
    if fits:
        return [event]
    obj, about_object = over_budget_object(event["object"])
    cut = {**over_budget_details(size, digest, budget.limit), **about_object}
    if peer is not None:
        cut["peer"] = peer
    out = [{**event, "object": obj, "details": cut}]
    if budget.should_notice(event["actor"]):
        notice = {
            "actor": event["actor"],
            "action": BUDGET_ACTION,
            "object": event["actor"],
            "outcome": "denied",
            "details": {
                "budget_bytes": budget.limit,
                "used_bytes": used,
                "window_hours": WINDOW_SLOTS,
                "reason": "the account's server and kernels had more details recorded in the last 24 hours than "
                "[audit] user_daily_bytes; their events are still recorded, with details replaced by length and "
                "SHA-256",
                "peer": peer,
            },
        }
        out.insert(0, notice)
    return out


def handlers(
    site, log: logging.Logger, metrics: AuditMetrics | None = None, budget: ByteBudget | None = None
) -> dict[str, Any]:
    registry = Registry.for_state_dir(site.state_dir)
    counted = metrics or AuditMetrics(site)
    budgeted = budget or budget_for(site)

    known = tuple(p.name for p in site.projects)

    def record(peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        arrived = time.monotonic()
        member = registry.by_uid(peer.uid)
        origin = peer.origin if peer.delegated else peer_origin(peer)
        event = user_event(
            member.username if member else f"uid:{peer.uid}",
            peer,
            args,
            string_chars=site.audit.user_string_chars,
            details_bytes=(
                site.audit.user_details_bytes if origin in SERVER_ORIGINS else site.audit.kernel_details_bytes
            ),
            origin=origin,
            projects=member.projects if member else (),
            known_projects=known,
        )
        # root's own records are never cut; every other caller's count against its account's daily budget
        events = [event] if peer.is_root and not peer.delegated else within_budget(event, budgeted)
        try:
            rec = emit_many(site, events)[-1]  # type: ignore[arg-type]
        except RecordError as e:
            raise ChannelError(str(e), BAD_REQUEST) from None
        except AuditError as e:
            log.error("audit: %s", e)
            counted.failures.inc()
            raise ChannelError("the audit trail cannot be written; the operator has been told", UNAVAILABLE) from None
        counted.append_seconds.observe(time.monotonic() - arrived)
        counted.events.labels(event["action"], event["outcome"]).inc()
        return {"seq": rec["seq"], "hash": rec["hash"]}

    return {"record": record}


def serve(site, log: logging.Logger) -> None:
    """Serve ``<run_dir>/audit.sock`` (and the web view if the hub gave a URL) until SIGTERM/SIGINT."""
    directory = trail_dir(site)
    try:
        emit(site, actor="system", action="audit.start", details={"pid": os.getpid()})
    except AuditError as e:
        log.error("audit: %s", e)
        raise SystemExit(1) from None
    path = Path(socket_path(site, "audit"))
    metrics = AuditMetrics(site)
    budget = budget_for(site)
    server = ChannelServer(
        path, handlers(site, log, metrics, budget), name="audit", **channel_options(site, "audit", partial(emit, site))
    )
    log.info("audit: recording to %s, listening on %s", directory, path)
    url = os.environ.get("JUPYTERHUB_SERVICE_URL", "")
    stop = StopSignal()
    server.start_in_thread()
    web = None
    try:
        if url:
            from paitient.services.audit.web import run_in_thread

            web = run_in_thread(site, url, log, metrics.registry)
        stop.wait()
    finally:
        if web is not None:
            web.stop()
        server.shutdown()
        server.server_close()
        budget.save()
        emit(site, actor="system", action="audit.stop", details={"pid": os.getpid()})
        log.info("audit: stopped")
