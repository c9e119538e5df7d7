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
from collections.abc import Callable, Collection
from pathlib import Path
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


WORKSPACE_GROUP_RECORD = "workspace-group.json"
"""Under the state directory: the workspace's group, when this workspace made it (``paitient uninstall``
removes only a group it made)."""


def workspace_group(site: Any) -> int:
    """The gid of the workspace's group (``[accounts] group``), made (a system group, no members) if missing,
    and then recorded as this workspace's (:data:`WORKSPACE_GROUP_RECORD`)."""
    name = site.accounts.group
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        pass
    r = subprocess.run(["groupadd", "--system", name], capture_output=True, text=True)
    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        raise RuntimeError(
            f"the workspace group {name!r} does not exist and could not be made ({r.stderr.strip()}); "
            f"run: groupadd --system {name}"
        ) from None
    if r.returncode == 0:  # made here (not by a process that raced this one)
        from paitient.fsutil import atomic_write_json

        state = Path(site.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        atomic_write_json(state / WORKSPACE_GROUP_RECORD, {"group": name, "gid": gid}, mode=0o644)
    return gid


def remove_workspace_group(site: Any, *, dry_run: bool = False, leaving: Collection[str] = ()) -> str:
    """Delete the workspace's group if this workspace made it and no account is in it any more (another
    workspace on this machine that shares the group keeps its accounts there); what was done, in a line.
    ``leaving``: accounts counted as gone already (a dry run's, before the accounts are removed)."""
    import json

    path = Path(site.state_dir) / WORKSPACE_GROUP_RECORD
    try:
        made = json.loads(path.read_text())
    except FileNotFoundError:
        try:
            grp.getgrnam(site.accounts.group)
        except KeyError:
            return f"no workspace group {site.accounts.group} on this machine"
        return f"kept the workspace group {site.accounts.group}: this workspace did not make it"
    name, gid = str(made.get("group", "")), int(made.get("gid", -1))
    try:
        group = grp.getgrgid(gid)
    except KeyError:
        group = None
    if group is None or group.gr_name != name:
        if not dry_run:
            path.unlink()
        return f"the workspace group {name} is gone already (gid {gid})"
    if members := sorted(set(group.gr_mem) - set(leaving)):
        return f"kept the workspace group {name}: accounts are still in it ({', '.join(members)})"
    if dry_run:
        return f"would remove the workspace group {name} (gid {gid})"
    r = subprocess.run(["groupdel", name], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"groupdel {name} failed (exit {r.returncode}): {r.stderr.strip()}")
    path.unlink()
    return f"removed the workspace group {name} (gid {gid})"


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
    through ``emit(actor=..., action=..., ...)``; a pod's caller through the gateway (``[workspace]
    gateway_uid``, when set)."""
    return {
        "delegate_uid": site.workspace.gateway_uid or None,
        "mode": SOCKET_MODE,
        "group": workspace_group(site),
        "admit": RegisteredCallers(site, service),
        "limits": WORKSPACE_LIMITS,
        "on_refusal": RefusalRecorder(site, service, emit),
    }
