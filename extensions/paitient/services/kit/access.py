"""Who may use the root-side services' sockets (audit, ledger, airlock, jobs), and how much.

Three layers, each enough to stop an unrelated local account on its own:

- the socket file is ``root:<[accounts] group>`` mode 0660: only root and the workspace's accounts (the hub
  adds every account it creates to that group; their servers and kernels inherit it) can connect at all;
- the caller's uid (``SO_PEERCRED``, vouched for by the kernel) must be root or a member in the registry;
  any other uid is refused with ``unknown_caller`` before its request is read;
- each uid has a token bucket and a cap on connections at once, and all callers together a cap on
  connections (:data:`WORKSPACE_LIMITS`), so a flood from one account is refused (``rate_limited``,
  ``too_many_connections``) instead of delaying the records of the others.

Every refusal is written to the audit trail as ``channel.refused`` (actor: the member, or ``uid:<n>``),
at most once a minute per uid, service and reason; the record says how many refusals it stands for.
"""

from __future__ import annotations

import grp
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from paitient.channel import UNKNOWN_CALLER, ChannelError, Peer
from paitient.registry import Registry
from paitient.services.kit.channel import Limits

log = logging.getLogger("paitient.services.kit.access")

SOCKET_MODE = 0o660
WORKSPACE_LIMITS = Limits(rate=50.0, burst=100, per_uid=8, total=64)
"""Per uid: 50 requests per second on average, bursts of 100, 8 connections at once; 64 connections at once
in all. A notebook records one event per executed cell and makes a few ledger or airlock calls per action."""
REFUSAL_RECORD_SECONDS = 60.0


def workspace_group(site: Any) -> int:
    """The gid of the workspace's group (``[accounts] group``), made (a system group, no members) if missing."""
    name = site.accounts.group
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        pass
    r = subprocess.run(["groupadd", "--system", name], capture_output=True, text=True)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise RuntimeError(
            f"the workspace group {name!r} does not exist and could not be made ({r.stderr.strip()}); "
            f"run: groupadd --system {name}"
        ) from None


class RegisteredCallers:
    """The ``admit`` rule of the services: root or a uid in the registry. Re-reads the registry when it changes."""

    def __init__(self, site: Any, service: str):
        self.registry = Registry.for_state_dir(site.state_dir)
        self.service = service
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._uids: frozenset[int] = frozenset()

    def uids(self) -> frozenset[int]:
        try:
            st = os.stat(self.registry.path)
            key = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            key = (0, 0)
        with self._lock:
            if key != self._seen:
                self._uids = frozenset(m.uid for m in self.registry.all())
                self._seen = key
            return self._uids

    def __call__(self, peer: Peer) -> None:
        if peer.is_root or peer.uid in self.uids():
            return
        account = peer.account or "no account"
        raise ChannelError(
            f"the {self.service} service serves only this workspace's accounts; uid {peer.uid} ({account}) is not "
            "one of them. Sign in to the workspace through the hub and work from its notebooks, or ask the "
            "workspace operator",
            UNKNOWN_CALLER,
        )


class RefusalRecorder:
    """``on_refusal``: a ``channel.refused`` audit record per uid, service and reason, at most once per
    ``interval`` seconds (the next one counts the refusals in between)."""

    def __init__(
        self,
        site: Any,
        service: str,
        emit: Callable[..., Any],
        *,
        interval: float = REFUSAL_RECORD_SECONDS,
    ):
        self.registry = Registry.for_state_dir(site.state_dir)
        self.service = service
        self.emit = emit
        self.interval = interval
        self._lock = threading.Lock()
        self._last: dict[tuple[int, str], tuple[float, int]] = {}

    def __call__(self, peer: Peer, error: ChannelError) -> None:
        key = (peer.uid, error.code)
        now = time.monotonic()
        with self._lock:
            last, skipped = self._last.get(key, (float("-inf"), 0))
            if now - last < self.interval:
                self._last[key] = (last, skipped + 1)
                return
            self._last[key] = (now, 0)
            if len(self._last) > 10000:
                self._last = {k: v for k, v in self._last.items() if now - v[0] < self.interval}
        log.warning(
            "%s: refused uid %d (pid %d): %s (%d more refusals of it in the last %g s)",
            self.service,
            peer.uid,
            peer.pid,
            error.code,
            skipped,
            self.interval,
        )
        member = self.registry.by_uid(peer.uid)
        try:
            self.emit(
                actor=member.username if member else f"uid:{peer.uid}",
                action="channel.refused",
                object=self.service,
                outcome="denied",
                details={
                    "code": error.code,
                    "reason": str(error),
                    "peer": {"pid": peer.pid, "uid": peer.uid, "gid": peer.gid},
                    "refusals_not_recorded_before": skipped,
                },
            )
        except Exception as e:  # the refusal stands; the trail being down is the audit service's to report
            log.error("%s: could not record a refused connection of uid %d: %s", self.service, peer.uid, e)


def channel_options(site: Any, service: str, emit: Callable[..., Any]) -> dict[str, Any]:
    """Keyword arguments of :class:`~paitient.services.kit.channel.ChannelServer` for a workspace service:
    mode 0660 and the workspace group, registered callers only, :data:`WORKSPACE_LIMITS`, refusals recorded
    through ``emit(actor=..., action=..., ...)``."""
    return {
        "mode": SOCKET_MODE,
        "group": workspace_group(site),
        "admit": RegisteredCallers(site, service),
        "limits": WORKSPACE_LIMITS,
        "on_refusal": RefusalRecorder(site, service, emit),
    }
