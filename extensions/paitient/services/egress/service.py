"""The egress service: the root-side half of the gate every byte to a researcher's browser passes.

Run by ``paitient service egress`` (a JupyterHub managed service). It listens on
``<state_dir>/gate/egress.sock``, a folder no kernel sandbox binds, so only the users' servers reach it; a
server's user is whoever its uid is in the registry (``SO_PEERCRED``), never what it says. A Kubernetes pod's
server reaches it through the pod's relay and the services' gateway: the gateway's uid (and no other) opens the
connection with a frame naming the pod's server (``on_behalf``), whose user is then the caller. Each server keeps
one connection and sends every piece of output before it forwards it (kernel messages, files and notebooks,
API responses), framed as in :mod:`paitient.rules.egress`. For each piece the service

- finds the dataset rows it reveals with the exact-data-match indexes of the user's projects,
- adds them to the rows its whole output (an execution, a file, a notebook: the *context*) revealed so far,
- counts them, and its bytes, against the user's day (:mod:`.store`), and
- answers forward or withhold, with the notice the researcher reads (:func:`paitient.rules.egress.decide`).

What left is recorded in the audit trail: one ``egress.output`` record per context (channel, bytes, SHA-256
of what was forwarded, rows per dataset, verdict) when it ends, and an ``egress.withheld`` record the moment
a piece is withheld. Records the trail cannot take wait for it, held in the counts' database
(:mod:`paitient.services.kit.backlog`). When the trail cannot be written, or rows cannot be matched, pieces
larger than ``fail_closed_bytes`` are withheld until it can, and the smaller ones a user receives meanwhile
may add up to ``unchecked_bytes``; the first checked piece of that user renews the allowance.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import socket
import socketserver
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from paitient.channel import FORBIDDEN, ChannelError, Peer, recv_exactly
from paitient.config import EgressLimits, SiteConfig
from paitient.registry import Member, Registry
from paitient.rules.edm.tokens import UnreadableText
from paitient.rules.egress import (
    ON_BEHALF,
    FrameError,
    decide,
    encode_frame,
    read_header,
)
from paitient.rules.records import Event
from paitient.rules.shown import TooManyOverwrites
from paitient.services.audit import trail_writer
from paitient.services.egress import socket_path
from paitient.services.egress.counts import Counts
from paitient.services.egress.indexer import Indexer
from paitient.services.egress.matcher import Matcher, MissingIndex
from paitient.services.egress.metrics import EgressMetrics
from paitient.services.egress.store import EgressStore, today
from paitient.services.kit.access import SOCKET_MODE, RefusalRecorder, workspace_group
from paitient.services.kit.backlog import Backlog, HeldRecords
from paitient.services.kit.channel import UnixSocketServer, delegated_peer

MAX_CONTEXTS = 512
"""Open contexts per connection; the oldest is closed (and recorded) beyond this."""
IDLE_SECONDS = 60.0
"""A context without a piece for this long is closed and recorded."""
CLOSED_OUTPUTS = 4096
"""Closed executions per user whose rows are kept (:attr:`Context.before`), the latest that showed rows:
at least as many as the executions the user's servers charge output to (256 a kernel,
:data:`paitient.rules.outputcap.TRACKED_EXECUTIONS`) across a server's kernels."""
CHANNELS = frozenset({"kernel", "contents", "http"})
RECORD_QUEUE = 10_000
"""Audit records waiting for the trail; beyond this the trail counts as down (outputs fail closed)."""
WRITER_WAIT = 40.0
"""Seconds a starting service waits for the one before it to let go of the counts before it gives up."""
RECORD_BATCH = 256
"""At most this many queued records go into the trail in one append."""
RECORD_LINGER = 0.05
"""Seconds the writer waits after a record for more to write with it (a record is on disk this much later)."""
MISSING_SECONDS = 60.0
"""How often the service looks for newly published versions without a row index (outputs find them sooner)."""
TAIL_BYTES = 4096
"""The end of an output's forwarded text that the row detection reads again with its next piece: a row that
a kernel prints a value at a time (``print(v, end=',', flush=True)``) reaches the browser as many messages,
which it shows as one text."""

log = logging.getLogger("paitient.services.egress")


class CountsUnavailable(RuntimeError):
    """The counts of what left cannot be stored (:meth:`paitient.services.egress.counts.Counts.trouble`)."""


def with_tail(tail: bytes, text: bytes) -> bytes:
    """The text the row detection reads for a piece: the piece after the end of the output's text before it,
    on a line of its own, so that a record can span the two (a row printed over several messages)."""
    return tail + b"\n" + text if tail else text


def next_tail(scanned: bytes) -> bytes:
    """The last :data:`TAIL_BYTES` (at most) of ``scanned``, from the start of a line."""
    if len(scanned) <= TAIL_BYTES:
        return scanned
    cut = scanned.find(b"\n", len(scanned) - TAIL_BYTES)
    return scanned[cut + 1 :] if cut >= 0 else b""


def limits_for(site: SiteConfig, member: Member) -> EgressLimits:
    """The limits of a user: the strictest of each over their projects ([egress] and projects' overrides)."""
    return site.egress_for_user(member.projects)


@dataclass
class Context:
    """One output as the researcher sees it: an execution's messages, one file, one notebook."""

    name: str
    channel: str
    object: str
    rows: dict[str, set[int]] = field(default_factory=dict)
    size: int = 0
    pieces: int = 0
    withheld: int = 0
    reason: str = ""
    pod: str = ""
    """The Kubernetes pod whose server sent it, as the gateway vouched for it; empty on a host."""
    sha256: Any = field(default_factory=hashlib.sha256)
    last: float = field(default_factory=time.monotonic)
    tail: bytes = b""
    """The end of the text forwarded so far (:func:`with_tail`)."""
    before: dict[str, frozenset[int]] = field(default_factory=dict)
    """The rows an earlier context of the same execution showed before it was closed (at its reply, idle, or
    crowded out): a kernel's later messages charged to that execution count on from them, never from zero.
    At most ``max_rows_per_output + 1`` of a dataset are kept: enough to know that one more is too many."""

    def output_rows(self) -> dict[str, int]:
        """Distinct rows per dataset of the whole output, those shown before it was closed included."""
        if not self.before:
            return {k: len(v) for k, v in self.rows.items()}
        return {k: len(v | self.before.get(k, frozenset())) for k, v in self.rows.items()}

    def kept(self, limit: int) -> dict[str, frozenset[int]]:
        """What :attr:`before` holds once this context is closed: its rows, and those before it, ``limit + 1``
        of a dataset at most."""
        out = {}
        for key in self.rows.keys() | self.before.keys():
            rows = self.rows.get(key, set()) | self.before.get(key, frozenset())
            out[key] = frozenset(sorted(rows)[: limit + 1]) if len(rows) > limit + 1 else frozenset(rows)
        return out

    def record(self) -> dict[str, Any]:
        verdict = "forwarded" if not self.withheld else ("withheld" if not self.size else "partly withheld")
        return {
            **({"pod": self.pod} if self.pod else {}),
            "channel": self.channel,
            "context": self.name[:200],
            "bytes": self.size,
            "sha256": self.sha256.hexdigest(),
            "rows": {k: len(v) for k, v in sorted(self.rows.items())},
            "pieces": self.pieces,
            "withheld": self.withheld,
            "reason": self.reason,
            "verdict": verdict,
        }


class KernelOutputs:
    """The rows each user's kernel outputs showed, kept across the connections of their servers.

    A server's gate keeps one connection, but it connects anew when one breaks (a timeout, the service busy):
    an execution's output then goes on in a context of the new connection, which counts on from the rows the
    same output showed on the old one, open there still or closed (:attr:`Context.before`), never from zero.
    Each user keeps the latest :data:`CLOSED_OUTPUTS` closed outputs that showed rows."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        """Held while a context's rows change, so that another connection reads them whole."""
        self._open: dict[tuple[str, str], list[Context]] = {}
        self._closed: dict[str, OrderedDict[str, dict[str, frozenset[int]]]] = {}

    def opened(self, user: str, ctx: Context, limit: int) -> None:
        """A connection opens the kernel output ``ctx``: it starts from what the output of its name showed."""
        with self.lock:
            before = self._closed.get(user, OrderedDict()).pop(ctx.name, {})
            for other in self._open.get((user, ctx.name), []):
                before = _union(before, other.kept(limit))
            ctx.before = before
            self._open.setdefault((user, ctx.name), []).append(ctx)

    def retired(self, user: str, ctx: Context, limit: int) -> None:
        """A connection closed ``ctx`` (its reply, an idle minute, crowded out, or the connection's end)."""
        with self.lock:
            key = (user, ctx.name)
            others = [c for c in self._open.get(key, []) if c is not ctx]
            if others:
                self._open[key] = others
            else:
                self._open.pop(key, None)
            if not (ctx.rows or ctx.before):
                return
            closed = self._closed.setdefault(user, OrderedDict())
            closed[ctx.name] = _union(closed.get(ctx.name, {}), ctx.kept(limit))
            closed.move_to_end(ctx.name)
            while len(closed) > CLOSED_OUTPUTS:
                closed.popitem(last=False)


def _union(a: dict[str, frozenset[int]], b: dict[str, frozenset[int]]) -> dict[str, frozenset[int]]:
    return {k: a.get(k, frozenset()) | b.get(k, frozenset()) for k in a.keys() | b.keys()}


class EgressService:
    """What the socket's handlers call; one instance per process."""

    def __init__(
        self,
        site: SiteConfig,
        store: EgressStore,
        matcher: Matcher,
        registry: Registry,
        *,
        emit: Callable[..., Any] | None = None,
        logger: logging.Logger | None = None,
    ):
        self.site, self.store, self.matcher, self.registry = site, store, matcher, registry
        self.log = logger or log
        self.counts = Counts(store, self.log)
        """Today's counts: decided on in memory, written to ``store`` behind the answers (:mod:`.counts`)."""
        self.outputs = KernelOutputs()
        self._write = trail_writer(site, emit)
        self.audit_ok = True
        # Bytes each user received unchecked since their outputs were last checked (bounded by unchecked_bytes).
        self._unchecked: dict[str, int] = {}
        self._unchecked_lock = threading.Lock()
        # Records are written by one thread of their own: a record is an append and an fsync (milliseconds),
        # which must not hold up the output it describes. A failed write marks the trail down, and outputs
        # fail closed from the next piece on; a full queue counts as down too.
        # Each record waits with the monotonic time it was queued at: the metrics' audit lag.
        self._records: queue.Queue[tuple[float, dict[str, Any]] | None] = queue.Queue(maxsize=RECORD_QUEUE)
        # What the trail refused waits, held in the store's database, and goes first once it takes records.
        self.backlog = Backlog(HeldRecords(store.db), lambda records: self._write(records), self.log, "egress")
        self.metrics = EgressMetrics(self)
        self._writer = threading.Thread(target=self._write_records, name="egress-audit", daemon=True)
        self._writer.start()

    # -- the audit trail ------------------------------------------------------------------------

    def emit(self, *, actor: str, action: str, object: str, outcome: str, details: dict[str, Any]) -> bool:
        """Queue one record for the trail; False (and the trail counts as down) when the queue is full."""
        try:
            self._records.put_nowait(
                (
                    time.monotonic(),
                    {"actor": actor, "action": action, "object": object, "outcome": outcome, "details": details},
                )
            )
        except queue.Full:
            self.metrics.audit_failures.inc()
            self._trail_down("the record queue is full")
            return False
        return True

    def pending_records(self) -> int:
        """Records queued for the trail or waiting for it, not yet written."""
        return self._records.qsize() + self.backlog.waiting

    def pending_counts(self) -> int:
        """Outputs counted and not yet in the store."""
        return self.counts.waiting

    def _write_records(self) -> None:
        """Write what is queued in batches: whatever queued up while the last batch was written goes in one
        append (one lock, one fsync), so a busy service writes more records per fsync, not fewer outputs."""
        if self.backlog.waiting and not self.backlog.flush():  # records held by the service before this one
            self._trail_down(self.backlog.last_error)
        stop = False
        while not stop:
            batch = [self._records.get()]
            if batch[-1] is not None:
                time.sleep(RECORD_LINGER)  # let the records of the outputs that follow join this one's fsync
            while batch[-1] is not None and len(batch) < RECORD_BATCH:
                try:
                    batch.append(self._records.get_nowait())
                except queue.Empty:
                    break
            queued = [r for r in batch if r is not None]
            records = [record for _, record in queued]
            stop = len(records) < len(batch)
            try:
                if not records and not self.backlog.waiting:
                    continue
                if not self.backlog.write(cast(list[Event], records)):
                    self.metrics.audit_failures.inc(len(records))
                    self._trail_down(self.backlog.last_error)
                    continue
                written = time.monotonic()
                for at, _ in queued:
                    self.metrics.audit_lag.observe(written - at)
                if not self.audit_ok:
                    self.log.info("egress: the audit trail records again")
                    self.audit_ok = True
            finally:
                for _ in batch:
                    self._records.task_done()

    def _trail_down(self, why: str) -> None:
        if self.audit_ok:
            self.log.error("egress: cannot write the audit trail (%s); large outputs are withheld", why)
        self.audit_ok = False

    def flush(self) -> None:
        """Wait until every queued record is written (or failed)."""
        self._records.join()

    def close(self) -> None:
        """Write what is queued (records and counts), then stop the writers."""
        self._records.put(None)
        self._writer.join(30)
        self.counts.close()

    def record_context(self, member: Member, ctx: Context) -> bool:
        if not ctx.pieces:
            return True
        outcome = "ok" if not ctx.withheld else "denied"
        return self.emit(
            actor=member.username,
            action="egress.output",
            object=ctx.object[:1024],
            outcome=outcome,
            details=ctx.record(),
        )

    # -- one piece of output ------------------------------------------------------------------

    def check(self, member: Member, ctx: Context, text: bytes, payload: bytes) -> dict[str, Any]:
        with self.metrics.check_seconds.time():
            return self._check(member, ctx, text, payload)

    def _check(self, member: Member, ctx: Context, text: bytes, payload: bytes) -> dict[str, Any]:
        limits = limits_for(self.site, member)
        checked = self.audit_ok
        # A matcher that fails on this text (not for want of an index) may fail because of what the text is:
        # the piece is withheld outright, so no text made to fail it passes on the unchecked allowance.
        failed_on_text = False
        unreadable = ""
        scanned = with_tail(ctx.tail, text)  # rows of the tail found again count once: they are sets
        try:
            found = self.matcher.reveal(scanned, member.projects)
        except MissingIndex as e:
            self.log.error("egress: %s", e)
            found, checked = {}, False
        except (UnreadableText, TooManyOverwrites) as e:  # the text, not the matcher: withheld with why
            self.log.info("egress: an output of %s is not read: %s", member.username, e)
            found, unreadable = {}, str(e)
        except Exception:
            self.log.exception("egress: matching failed")
            found, checked, failed_on_text = {}, False, True
        with self.outputs.lock:
            for key, ids in found.items():
                ctx.rows.setdefault(key, set()).update(int(i) for i in ids)
        output_rows = ctx.output_rows()
        day = today()
        over = any(n > limits.max_rows_per_output for n in output_rows.values())
        new_rows = {} if over else {k: [int(i) for i in v] for k, v in found.items()}
        trouble = self.counts.trouble()
        if trouble:  # refused: the user's server passes only its allowance of unchecked bytes
            raise CountsUnavailable(trouble)
        # the decision and its count in one step for this user: two outputs at once cannot both pass the last
        # of a budget
        with self.counts.of(member.username, day) as counts:
            unseen = counts.unseen(new_rows)
            with self._unchecked_lock:
                if checked:
                    self._unchecked.pop(member.username, None)
                spent = limits.unchecked_bytes if failed_on_text else self._unchecked.get(member.username, 0)
                decision = decide(
                    limits,
                    output_rows=output_rows,
                    new_day_rows=len(unseen),
                    day_rows=counts.rows,
                    day_bytes=counts.bytes,
                    size=len(payload),
                    checked=checked,
                    unchecked_spent=spent,
                    unreadable=unreadable,
                )
                if not checked and decision.forward:
                    self._unchecked[member.username] = self._unchecked.get(member.username, 0) + len(payload)
            if decision.forward:
                self.counts.count(counts, len(payload), unseen)
            else:
                self.counts.count_withheld(counts)
            day_rows, day_bytes = counts.rows, counts.bytes
        ctx.pieces += 1
        ctx.last = time.monotonic()
        self.metrics.pieces.labels(ctx.channel, decision.verdict.value).inc()
        if decision.forward:
            self.metrics.bytes.labels(ctx.channel).inc(len(payload))
            ctx.size += len(payload)
            ctx.sha256.update(payload)
            ctx.tail = next_tail(scanned)
        else:
            reason = decision.reason.value if decision.reason else ""
            self.metrics.withheld.labels(ctx.channel, reason).inc()
            first = not ctx.withheld
            ctx.withheld += 1
            ctx.reason = ctx.reason or reason
            if first:
                self.emit(
                    actor=member.username,
                    action="egress.withheld",
                    object=ctx.object[:1024],
                    outcome="denied",
                    details={
                        **({"pod": ctx.pod} if ctx.pod else {}),
                        "channel": ctx.channel,
                        "context": ctx.name[:200],
                        "bytes": len(payload),
                        "sha256": hashlib.sha256(payload).hexdigest(),
                        "rows": output_rows,
                        "reason": reason,
                    },
                )
        return {
            "verdict": decision.verdict.value,
            "reason": decision.reason.value if decision.reason else None,
            "notice": decision.notice,
            "rows": output_rows,
            "day_rows": day_rows,
            "day_bytes": day_bytes,
        }


class _Connection(socketserver.BaseRequestHandler):
    """One user's server: a loop of frames until it hangs up."""

    server: EgressServer

    def setup(self) -> None:
        self.contexts: OrderedDict[str, Context] = OrderedDict()
        self.member: Member | None = None
        self.pod = ""
        self.server.service.metrics.connections.inc()

    def finish(self) -> None:
        self.server.service.metrics.connections.dec()

    def _recv(self, n: int) -> bytes:
        return recv_exactly(self.request, n, EOFError)

    def _send(self, header: dict[str, Any]) -> None:
        self.request.sendall(encode_frame(header))

    def handle(self) -> None:
        sock: socket.socket = self.request
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        service = self.server.service
        delegate = self.server.delegate_uid
        self.member = None if uid == delegate else service.registry.by_uid(uid)
        try:
            first = True
            while True:
                head, size = read_header(self._recv)
                payload = self._recv(size) if size else b""
                if first and head.get("op") == ON_BEHALF:
                    if not self.speak_for(Peer(pid=pid, uid=uid, gid=gid), head):
                        return
                    first = False
                    continue
                first = False
                if self.member is None:
                    error = (
                        f"uid {uid} is the workspace's gateway: it opens a connection with {ON_BEHALF} (a pod's "
                        "server), and only then sends outputs"
                        if uid == delegate
                        else f"uid {uid} is not a workspace user"
                    )
                    self._send({"id": head.get("id"), "ok": False, "code": "forbidden", "error": error})
                    return
                self._send(self.answer(head, payload))
        except (EOFError, ConnectionError):
            pass
        except FrameError as e:
            service.log.warning("egress: closing a connection from uid %d: %s", uid, e)
        finally:
            if self.member is not None:
                for ctx in self.contexts.values():
                    self._retire(ctx)
            self.contexts.clear()

    def speak_for(self, peer: Peer, head: dict[str, Any]) -> bool:
        """The connection's first frame named the server it carries (``on_behalf``): taken from the gateway's
        uid only, for a pod's server only, for a workspace user only; answered either way. False: refused (the
        refusal is on the trail as ``channel.refused``, and the connection ends)."""
        service = self.server.service
        try:
            caller = delegated_peer(peer, head.get("on_behalf"), self.server.delegate_uid, "the egress service")
            if caller.origin != "server":
                raise ChannelError(
                    "the egress gate serves a pod's server only; a kernel's outputs reach it through its server",
                    FORBIDDEN,
                )
            member = service.registry.by_uid(caller.uid)
            if member is None:
                raise ChannelError(f"uid {caller.uid} is not a workspace user", FORBIDDEN)
        except ChannelError as e:
            self.server.refused(peer, e)
            self._send({"id": head.get("id"), "ok": False, "code": e.code, "error": str(e)})
            return False
        self.member, self.pod = member, caller.pod
        self._send({"id": head.get("id"), "ok": True, "user": member.username, "pod": caller.pod})
        return True

    def context(self, head: dict[str, Any]) -> Context:
        name = str(head.get("context") or "")[:512]
        channel = str(head.get("channel") or "")
        if channel not in CHANNELS:
            raise ValueError(f"channel must be one of {', '.join(sorted(CHANNELS))}")
        ctx = self.contexts.get(name)
        if ctx is None:
            ctx = self.contexts[name] = Context(name, channel, str(head.get("object") or name)[:1024], pod=self.pod)
            if channel == "kernel":
                assert self.member is not None
                self.server.service.outputs.opened(self.member.username, ctx, self._limit())
            while len(self.contexts) > MAX_CONTEXTS:
                _, old = self.contexts.popitem(last=False)
                self._retire(old)
        self.contexts.move_to_end(name)
        return ctx

    def answer(self, head: dict[str, Any], payload: bytes) -> dict[str, Any]:
        service = self.server.service
        assert self.member is not None
        rid = head.get("id")
        op = head.get("op")
        try:
            if op == "hello":
                limits = limits_for(service.site, self.member)
                return {"id": rid, "ok": True, "user": self.member.username, "limits": limits.to_dict()}
            if op == "check":
                text_size = head.get("text", len(payload))
                if not isinstance(text_size, int) or not 0 <= text_size <= len(payload):
                    raise ValueError("text must count the leading text bytes of the payload")
                ctx = self.context(head)
                result = service.check(self.member, ctx, payload[:text_size], payload)
                if head.get("final"):
                    self._retire(self.contexts.pop(ctx.name))
                self._sweep()
                return {"id": rid, "ok": True, **result}
            if op == "close":
                name = str(head.get("context") or "")[:512]
                recorded = self._retire(self.contexts.pop(name)) if name in self.contexts else True
                return {"id": rid, "ok": True, "recorded": recorded}
            return {"id": rid, "ok": False, "code": "unknown_op", "error": f"unknown operation {op!r}"}
        except ValueError as e:
            return {"id": rid, "ok": False, "code": "bad_request", "error": str(e)}
        except CountsUnavailable as e:
            return {"id": rid, "ok": False, "code": "unavailable", "error": str(e)}
        except Exception:
            service.log.exception("egress: request %r failed", op)
            return {"id": rid, "ok": False, "code": "internal", "error": "internal error in the egress service"}

    def _sweep(self) -> None:
        """Close and record contexts nobody added to for a while (an execution that ended unseen)."""
        now = time.monotonic()
        assert self.member is not None
        for name in [n for n, c in self.contexts.items() if now - c.last > IDLE_SECONDS]:
            self._retire(self.contexts.pop(name))

    def _retire(self, ctx: Context) -> bool:
        """Record a closed context; keep the rows of an execution's (:class:`KernelOutputs`): the kernel may send
        more of its output later (after its reply, an idle minute, or on a new connection), charged to it."""
        assert self.member is not None
        if ctx.channel == "kernel":
            self.server.service.outputs.retired(self.member.username, ctx, self._limit())
        return self.server.service.record_context(self.member, ctx)

    def _limit(self) -> int:
        assert self.member is not None
        return limits_for(self.server.service.site, self.member).max_rows_per_output


class EgressServer(UnixSocketServer):
    """The gate's socket: one long connection per user's server. Its folder (0755) is bound into no sandbox."""

    def __init__(self, path: str | os.PathLike[str], service: EgressService, *, group: int | None = None):
        """``group``: the workspace's group, whose accounts' servers connect (the socket is root:group 0660);
        None leaves it root's group (tests whose callers run as root)."""
        self.service = service
        self.delegate_uid: int | None = service.site.workspace.gateway_uid or None
        """The gateway's uid (``[workspace] gateway_uid``): the one peer that may open a connection on behalf of a
        pod's server."""
        self.refused = RefusalRecorder(service.site, "egress", service.emit)
        Path(path).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(Path(path).parent, 0o755)
        super().__init__(path, _Connection, name="egress", mode=SOCKET_MODE, group=group)


def custom_scopes() -> dict[str, dict[str, str]]:
    """For ``c.JupyterHub.custom_scopes``; stewards get it (with ``access:services!service=egress``)."""
    from paitient.services.egress.web import READ_SCOPE

    return {READ_SCOPE: {"description": "Read what reached the browsers of the users of one's projects."}}


def role_scopes() -> list[str]:
    from paitient.services.egress.web import READ_SCOPE

    return [READ_SCOPE, "access:services!service=egress"]


def hub_service(site: SiteConfig, python: str, *, port: int = 0) -> dict[str, Any]:
    """The JupyterHub managed-service entry that runs the egress service and its stewards' page."""
    from paitient.services.egress.web import READ_SCOPE
    from paitient.services.kit.process import managed_service

    return managed_service(
        site,
        "egress",
        python,
        port=port,
        scopes=[READ_SCOPE],
        description="Egress: what reached researchers' browsers (stewards, read-only)",
    )


def serve(site: SiteConfig, logger: logging.Logger) -> None:
    """Serve the gate's socket (and the stewards' page if the hub gave a URL) until SIGTERM/SIGINT."""
    from paitient.rules.edm import compiled_match, compiled_records, compiled_tokens

    # the scanner's machine code loaded (or compiled) now, not at a first output
    compiled_tokens.warm_up()
    compiled_match.warm_up()
    compiled_records.warm_up()
    store = EgressStore.for_site(site)  # [database] url's schema egress, or <state_dir>/egress/egress.sqlite3
    try:
        # the service decides on the counts it holds: no second one may write them (one a restart replaces may
        # still be storing its last counts: it is given the time a stop takes)
        with store.sole_writer(wait=WRITER_WAIT):
            _serve(site, store, logger)
    finally:
        store.close()


def assemble(
    site: SiteConfig, store: EgressStore, registry: Registry, logger: logging.Logger
) -> tuple[EgressService, Indexer]:
    """The service with its matcher, and the indexer that builds what the matcher finds missing."""
    indexer = Indexer(site, logger)
    matcher = Matcher(site, logger, on_missing=indexer.want)
    service = EgressService(site, store, matcher, registry, logger=logger)
    indexer.on_built = service.metrics.index_built
    service.metrics.index_waiting.set_function(indexer.waiting)
    return service, indexer


def _serve(site: SiteConfig, store: EgressStore, logger: logging.Logger) -> None:
    from paitient.services.kit.process import StopSignal

    service, indexer = assemble(site, store, Registry.for_state_dir(site.state_dir), logger)
    matcher = service.matcher
    reported: set[str] = set()

    def look_for_missing() -> None:
        # every dataset of the site, not only those outputs asked about: the airlock's checks read the indexes too
        try:
            missing = set(matcher.missing())
        except Exception:  # an unreadable data root: the outputs' own checks say so; the service goes on
            logger.exception("egress: could not look for published versions without a row index")
            return
        for key in sorted(missing - reported):
            logger.warning(
                "egress: %s has no row index here: building it from the published data; until it is built, "
                "outputs of its projects are unchecked (at most unchecked_bytes pass)",
                key,
            )
        reported.clear()
        reported.update(missing)

    look_for_missing()
    server = EgressServer(socket_path(site), service, group=workspace_group(site))
    stop = StopSignal()
    server.start_in_thread()
    logger.info("egress: listening on %s", server.path)
    page = None
    url = os.environ.get("JUPYTERHUB_SERVICE_URL", "")
    try:
        if url:
            from paitient.services.egress.web import run_in_thread

            page = run_in_thread(site, store, url, logger, service.metrics.registry)
        while not stop.wait(MISSING_SECONDS):
            look_for_missing()
    finally:
        if page is not None:
            page.stop()
        server.shutdown()
        server.server_close()
        indexer.close()
        service.close()
        logger.info("egress: stopped")
