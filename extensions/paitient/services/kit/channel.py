"""The serving side of the services' unix sockets (the wire format is in :mod:`paitient.channel`).

A :class:`ChannelServer` answers each connection on a thread: it learns the caller from ``SO_PEERCRED``
(never from the request), reads one request within its time limit, dispatches ``op`` to a handler
``(peer, args, fds) -> result`` and answers ``{"ok": ...}``. A handler refuses by raising
:class:`~paitient.channel.ChannelError`; anything else it raises is logged here and the caller gets
``internal``, never a traceback.

**A delegated caller.** A caller in a user's Kubernetes pod reaches a service through the pod's relay and the
workspace's gateway (:mod:`paitient.services.relay`, :mod:`paitient.services.gateway`); the socket's peer is
then the gateway, and the request names the caller it speaks for (``on_behalf``: uid, pod, origin, pid, start).
A server accepts that only from the uid it was given as the gateway's (``delegate_uid``), and refuses it
(``forbidden``) from everyone else, before the handler runs; the handler receives the caller as a
:class:`~paitient.channel.Peer` with ``pod`` set, admitted and limited as a local caller of that uid would be.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import socketserver
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paitient.channel import (
    BAD_REQUEST,
    FORBIDDEN,
    INTERNAL,
    MAX_FDS,
    MAX_REQUEST,
    RATE_LIMITED,
    TIMEOUT,
    TOO_LARGE,
    TOO_MANY_CONNECTIONS,
    UNKNOWN_OP,
    ChannelError,
    Peer,
    read_line,
)

log = logging.getLogger("paitient.services.kit.channel")

ORIGINS = ("kernel", "server", "relay")
"""What the pod's relay says a caller is: a process it sees (a kernel), one in another pid namespace (the
user's server), or the relay itself (its reports of the pod's live processes)."""

Handler = Callable[[Peer, dict[str, Any], list[int]], Any]
Admit = Callable[[Peer], None]
"""Raises :class:`ChannelError` (``unknown_caller``) for a caller the service does not serve at all."""
OnRefusal = Callable[[Peer, ChannelError], None]
"""Told of every refused connection (to record it; it must not raise and must return quickly)."""


@dataclass(frozen=True)
class Limits:
    """How much of a service one uid may use: ``rate`` requests per second on average, up to ``burst`` at
    once; ``per_uid`` connections at once; ``total`` connections at once of all non-root callers."""

    rate: float = 50.0
    burst: int = 100
    per_uid: int = 8
    total: int = 64


Side = tuple[int, str]
"""Whose share of a service a connection takes: the caller's uid, and ``server`` for a process in the
service's pid namespace (a user's server here) or a pod's caller its relay saw as the server, ``kernel``
for any other (a sandboxed kernel)."""


SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
"""A pidfd of the process that connected (Linux 6.5), which a later process given the same pid is not."""


def pid_namespace_of(pid: int) -> bool | None:
    """Whether the process ``pid`` shares this one's pid namespace (the kernel vouches for it: a sandboxed
    kernel runs in another); None if it exited before we looked. Only for a process that cannot end and
    leave its pid to another meanwhile: a connection's peer is read by :func:`peer_pid_namespace`."""
    try:
        theirs = os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None
    return theirs == os.readlink("/proc/self/ns/pid")


def peer_pid_namespace(sock: socket.socket, pid: int) -> bool | None:
    """Whether the process that connected ``sock`` (``pid``, from ``SO_PEERCRED``) shares this one's pid
    namespace; None if it has ended.

    Read through the pidfd the kernel keeps for the connection (``SO_PEERPIDFD``): a pid names whichever
    process has it now, so a sandboxed kernel that connected and ended left the pid to the next process to
    start, and one started in this namespace (a user's server, a service's helper) made the connection read as
    its server's. A pidfd's ``NSpid`` lists the process's pid in this namespace and in each one below it:
    one entry is a process of this namespace, ``-1`` one that ended. Only where the kernel has no
    ``SO_PEERPIDFD`` (before Linux 6.5) is the pid read as :func:`pid_namespace_of` does."""
    try:
        fd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as e:
        if e.errno in (errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP):
            return pid_namespace_of(pid)
        return None  # ESRCH: it ended before the connection was taken
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        seen, levels = int(fields["Pid"]), fields["NSpid"].split()
    except (KeyError, ValueError):
        return None
    if seen < 0:
        return None  # ended
    return seen > 0 and len(levels) == 1  # 0: a process of a namespace above this one


def side_of(peer: Peer) -> Side:
    """The share ``peer`` draws on. A user's server and its kernels share a uid; each has caps of its own, so
    a kernel that holds its account's connections (or spends its requests) does not refuse its server's."""
    if peer.delegated:
        return peer.uid, "server" if peer.origin == "server" else "kernel"
    # ended before the connection was taken: the stricter share
    return peer.uid, "server" if peer.same_pid_namespace else "kernel"


class Admission:
    """Who may hold a connection now: the ``admit`` rule, the connection caps and a token bucket per uid and
    side (:func:`side_of`: an account's server, its kernels)."""

    def __init__(
        self,
        limits: Limits | None = None,
        admit: Admit | None = None,
        name: str = "service",
        delegate_uid: int | None = None,
    ):
        self.limits = limits
        self.admit = admit
        self.name = name
        self.delegate_uid = delegate_uid
        self._lock = threading.Lock()
        self._open: dict[Side, int] = {}
        self._total = 0
        self._buckets: dict[Side, tuple[float, float]] = {}

    def enter(self, peer: Peer) -> Side | None:
        """Admit ``peer`` or raise :class:`ChannelError`; the share it took when a slot was taken (give it back
        with :meth:`leave`), None when none was. The gateway's own connection takes no slot: the caller it
        speaks for is admitted once its request is read."""
        if peer.is_root or (self.delegate_uid is not None and peer.uid == self.delegate_uid and not peer.delegated):
            return None
        if self.admit is not None:
            self.admit(peer)
        limits = self.limits
        if limits is None:
            return None
        side = side_of(peer)
        with self._lock:
            mine = self._open.get(side, 0)
            if mine >= limits.per_uid:
                holder = "your account already holds" if side[1] == "server" else "your account's kernels already hold"
                raise ChannelError(
                    f"{self.name}: {holder} {mine} connections, the most it may hold at once; "
                    "wait for your earlier requests to finish and try again",
                    TOO_MANY_CONNECTIONS,
                )
            if self._total >= limits.total:
                raise ChannelError(
                    f"{self.name} is serving {self._total} connections, the most it takes at once; try again in a "
                    "moment, and tell the workspace operator if it keeps happening",
                    TOO_MANY_CONNECTIONS,
                )
            now = time.monotonic()
            tokens, then = self._buckets.get(side, (float(limits.burst), now))
            tokens = min(float(limits.burst), tokens + (now - then) * limits.rate)
            if tokens < 1.0:
                self._buckets[side] = (tokens, now)
                wait = (1.0 - tokens) / limits.rate
                sender = "your account" if side[1] == "server" else "your account's kernels"
                raise ChannelError(
                    f"{self.name}: {sender} sent more than {limits.rate:g} requests per second (bursts of "
                    f"{limits.burst}); wait {wait:.2f} s and try again",
                    RATE_LIMITED,
                )
            self._buckets[side] = (tokens - 1.0, now)
            self._open[side] = mine + 1
            self._total += 1
            if len(self._buckets) > 4 * limits.total + 1024:  # forget full buckets of uids gone quiet
                full = [k for k, (t, _) in self._buckets.items() if t >= limits.burst and k not in self._open]
                for k in full:
                    del self._buckets[k]
        return side

    def leave(self, side: Side) -> None:
        with self._lock:
            left = self._open.get(side, 0) - 1
            if left > 0:
                self._open[side] = left
            else:
                self._open.pop(side, None)
            self._total -= 1


def peer_of(sock: socket.socket) -> Peer:
    """The process on the other end of a connected unix socket, as the kernel recorded it at ``connect``."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return Peer(pid=pid, uid=uid, gid=gid, same_pid_namespace=peer_pid_namespace(sock, pid))


def read_request(sock: socket.socket, within: float | None = None) -> tuple[dict[str, Any], list[int]]:
    """One request line and the descriptors that came with it; :class:`ChannelError` if it is malformed.

    The request is ``{"op", "args"}``, with ``on_behalf`` when the line named a caller (who may do that is
    the server's decision, :func:`delegated_peer`); nothing else of the line is kept.

    At most :data:`MAX_FDS` descriptors come with one request, however many pieces its line comes in: each
    piece may bring some, and a caller that sent a few with every byte made the service hold all of them,
    until it could open nothing for anyone. With ``within``, the whole line must come within that many
    seconds (:class:`TimeoutError`), not each piece of it: a byte every few seconds held a connection."""
    fds: list[int] = []
    deadline = None if within is None else time.monotonic() + within

    def receive() -> bytes:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request line did not come in time")
            sock.settimeout(left)
        data, new_fds, flags, _addr = socket.recv_fds(sock, 65536, MAX_FDS)
        fds.extend(new_fds)
        if len(fds) > MAX_FDS or flags & socket.MSG_CTRUNC:
            raise ChannelError(
                f"a request carries at most {MAX_FDS} descriptors, sent with its line; send fewer", BAD_REQUEST
            )
        return data

    timeout = sock.gettimeout()
    try:
        buf = read_line(
            receive, MAX_REQUEST, lambda: ChannelError(f"request larger than {MAX_REQUEST} bytes; send less", TOO_LARGE)
        )
    except BaseException:
        _close_all(fds)
        raise
    finally:
        sock.settimeout(timeout)  # the answer is sent under the connection's own timeout, not what was left
    line = buf.split(b"\n", 1)[0]
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError):  # nested past the parser's recursion: as malformed as any other
        msg = None
    try:
        if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
            raise ChannelError('request must be one JSON line {"op": "...", "args": {...}}', BAD_REQUEST)
        args = msg.get("args", {})
        if not isinstance(args, dict):
            raise ChannelError("args must be a JSON object", BAD_REQUEST)
    except ChannelError:
        _close_all(fds)
        raise
    out = {"op": msg["op"], "args": args}
    if "on_behalf" in msg:
        out["on_behalf"] = msg["on_behalf"]
    return out, fds


def delegated_peer(peer: Peer, on_behalf: Any, delegate_uid: int | None, name: str) -> Peer:
    """The caller ``peer`` (the gateway) speaks for; :class:`ChannelError` (``forbidden``) when ``peer`` is not
    the gateway, ``bad_request`` when the caller is not well formed. Root is never spoken for."""
    if delegate_uid is None or peer.uid != delegate_uid or peer.delegated:
        raise ChannelError(
            f"{name} takes a caller named in the request (on_behalf) only from the workspace's gateway; uid "
            f"{peer.uid} is not it. Send the request without on_behalf: who you are comes from your connection",
            FORBIDDEN,
        )
    if not isinstance(on_behalf, dict) or set(on_behalf) != {"uid", "pod", "origin", "pid", "start"}:
        raise ChannelError("on_behalf must be {uid, pod, origin, pid, start}", BAD_REQUEST)
    uid, pod, origin, pid, start = (on_behalf[k] for k in ("uid", "pod", "origin", "pid", "start"))
    if type(uid) is not int or uid <= 0 or uid == delegate_uid:
        raise ChannelError(f"on_behalf.uid must be a user's uid, not root or the gateway's, got {uid!r}", BAD_REQUEST)
    if not isinstance(pod, str) or not pod or len(pod) > 128 or origin not in ORIGINS:
        raise ChannelError(f"on_behalf needs a pod and an origin ({' or '.join(ORIGINS)})", BAD_REQUEST)
    if type(pid) is not int or pid < 0 or not (start is None or (type(start) is int and start >= 0)):
        raise ChannelError("on_behalf.pid must be a pid (0: not seen) and start a start time or null", BAD_REQUEST)
    return Peer(pid=pid, uid=uid, gid=-1, pod=pod, origin=origin, start=start)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class _RequestHandler(socketserver.BaseRequestHandler):
    server: ChannelServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(self.server.timeout_seconds)
        fds: list[int] = []
        server = self.server
        try:
            peer = peer_of(sock)
        except OSError:
            return
        try:
            held = server.admission.enter(peer)
        except ChannelError as e:
            server.refused(peer, e)
            try:
                sock.sendall(json.dumps(e.to_wire()).encode() + b"\n")
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return
        try:
            self._serve(sock, peer, fds)
        finally:
            if held is not None:
                server.admission.leave(held)

    def _serve(self, sock: socket.socket, peer: Peer, fds: list[int]) -> None:
        server = self.server
        held: Side | None = None
        try:
            msg, fds = read_request(sock, within=server.timeout_seconds)
            if "on_behalf" in msg:
                try:
                    caller = delegated_peer(peer, msg["on_behalf"], server.admission.delegate_uid, server.name)
                except ChannelError as e:
                    server.refused(peer, e)  # who tried to speak for another is on record
                    raise
                try:
                    held = server.admission.enter(caller)
                except ChannelError as e:
                    server.refused(caller, e)
                    raise
                peer = caller
            elif server.admission.delegate_uid is not None and peer.uid == server.admission.delegate_uid:
                raise ChannelError(f"{server.name} serves the gateway only on behalf of a pod's caller", FORBIDDEN)
            handler = server.handlers.get(msg["op"])
            if handler is None:
                raise ChannelError(
                    f"unknown operation {msg['op']!r}; known: {', '.join(sorted(server.handlers))}", UNKNOWN_OP
                )
            answer = {"ok": True, "result": handler(peer, msg["args"], fds)}
        except ChannelError as e:
            answer = e.to_wire()
        except TimeoutError:
            answer = ChannelError(
                f"{self.server.name} received no complete request within {self.server.timeout_seconds:g} s; "
                "send the whole request line at once",
                TIMEOUT,
            ).to_wire()
        except Exception:
            log.exception("%s: request failed", self.server.name)
            answer = ChannelError(f"internal error in {self.server.name}; see its log", INTERNAL).to_wire()
        finally:
            _close_all(fds)
            if held is not None:
                server.admission.leave(held)
        try:
            sock.sendall(json.dumps(answer, default=str).encode() + b"\n")
        except OSError:
            pass  # the caller went away; nothing to tell it


STOP_POLL = 0.05
"""Seconds between a server loop's looks for a stop request, which is how long ``shutdown()`` may wait: at
socketserver's default of half a second, every service's stop and every restart waited for it."""


class PromptStop(socketserver.BaseServer):
    """A socketserver whose ``serve_forever`` looks for ``shutdown()`` every :data:`STOP_POLL` seconds."""

    def serve_forever(self, poll_interval: float = STOP_POLL) -> None:
        super().serve_forever(poll_interval)


class UnixSocketServer(PromptStop, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A threaded unix-socket server at ``path`` with ``mode``: an old socket there is replaced, anything else
    is refused; the socket goes when the server closes. Subclasses name their request handler."""

    daemon_threads = True
    allow_reuse_address = True
    # Many clients may connect at once (a class starting their training together): a short accept queue
    # makes a connect fail with EAGAIN on a unix socket instead of waiting.
    request_queue_size = 128

    def __init__(
        self,
        path: str | os.PathLike[str],
        handler: type[socketserver.BaseRequestHandler],
        *,
        name: str,
        mode: int = 0o666,
        group: int | None = None,
    ):
        self.path = Path(path)
        self.name = name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise RuntimeError(f"{self.path} exists and is not a socket; remove it or choose another path")
            self.path.unlink()
        super().__init__(str(self.path), handler)
        if group is not None:
            os.chown(self.path, -1, group)
        os.chmod(self.path, mode)

    def start_in_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name=f"{self.name}-socket", daemon=True)
        t.start()
        return t

    def server_close(self) -> None:
        super().server_close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class ChannelServer(UnixSocketServer):
    """A threaded unix-socket server dispatching ``op`` to handlers that receive the caller's :class:`Peer`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        handlers: dict[str, Handler],
        *,
        name: str = "service",
        mode: int = 0o666,
        group: int | None = None,
        timeout_seconds: float = 30.0,
        limits: Limits | None = None,
        admit: Admit | None = None,
        on_refusal: OnRefusal | None = None,
        delegate_uid: int | None = None,
    ):
        """``mode`` and ``group``: who may connect at all (the services: 0660, the workspace's group);
        ``admit``, ``limits``: who is served, how much (:class:`Admission`); ``on_refusal``: told of each
        refused connection; ``delegate_uid``: the gateway's uid, the one peer whose request may name the
        caller it speaks for (None: nobody's; never root)."""
        if delegate_uid == 0:
            raise ValueError("the gateway must not run as root: give it a uid of its own")
        self.handlers = handlers
        self.timeout_seconds = timeout_seconds
        self.admission = Admission(limits, admit, name, delegate_uid)
        self.on_refusal = on_refusal
        super().__init__(path, _RequestHandler, name=name, mode=mode, group=group)

    def refused(self, peer: Peer, error: ChannelError) -> None:
        # Not a warning per refusal: a flood would turn into a flood of log lines (on_refusal notes it, sparingly).
        log.debug("%s: refused uid %d (pid %d): %s", self.name, peer.uid, peer.pid, error.code)
        if self.on_refusal is not None:
            try:
                self.on_refusal(peer, error)
            except Exception:
                log.exception("%s: could not note a refused connection", self.name)
