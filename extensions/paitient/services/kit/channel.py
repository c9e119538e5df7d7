"""The serving side of the services' unix sockets (the wire format is in :mod:`paitient.channel`).

A :class:`ChannelServer` answers each connection on a thread: it learns the caller from ``SO_PEERCRED``
(never from the request), reads one request within its time limit, dispatches ``op`` to a handler
``(peer, args, fds) -> result`` and answers ``{"ok": ...}``. A handler refuses by raising
:class:`~paitient.channel.ChannelError`; anything else it raises is logged here and the caller gets
``internal``, never a traceback.
"""

from __future__ import annotations

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


class Admission:
    """Who may hold a connection now: the ``admit`` rule, the connection caps and a token bucket per uid."""

    def __init__(self, limits: Limits | None = None, admit: Admit | None = None, name: str = "service"):
        self.limits = limits
        self.admit = admit
        self.name = name
        self._lock = threading.Lock()
        self._open: dict[int, int] = {}
        self._total = 0
        self._buckets: dict[int, tuple[float, float]] = {}

    def enter(self, peer: Peer) -> bool:
        """Admit ``peer`` or raise :class:`ChannelError`; True when a slot was taken (give it back with
        :meth:`leave`)."""
        if peer.is_root:
            return False
        if self.admit is not None:
            self.admit(peer)
        limits = self.limits
        if limits is None:
            return False
        with self._lock:
            mine = self._open.get(peer.uid, 0)
            if mine >= limits.per_uid:
                raise ChannelError(
                    f"{self.name}: your account already holds {mine} connections, the most it may hold at once; "
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
            tokens, then = self._buckets.get(peer.uid, (float(limits.burst), now))
            tokens = min(float(limits.burst), tokens + (now - then) * limits.rate)
            if tokens < 1.0:
                self._buckets[peer.uid] = (tokens, now)
                wait = (1.0 - tokens) / limits.rate
                raise ChannelError(
                    f"{self.name}: your account sent more than {limits.rate:g} requests per second (bursts of "
                    f"{limits.burst}); wait {wait:.2f} s and try again",
                    RATE_LIMITED,
                )
            self._buckets[peer.uid] = (tokens - 1.0, now)
            self._open[peer.uid] = mine + 1
            self._total += 1
            if len(self._buckets) > 4 * limits.total + 1024:  # forget full buckets of uids gone quiet
                full = [u for u, (t, _) in self._buckets.items() if t >= limits.burst and u not in self._open]
                for u in full:
                    del self._buckets[u]
        return True

    def leave(self, peer: Peer) -> None:
        with self._lock:
            left = self._open.get(peer.uid, 0) - 1
            if left > 0:
                self._open[peer.uid] = left
            else:
                self._open.pop(peer.uid, None)
            self._total -= 1


def peer_of(sock: socket.socket) -> Peer:
    """The process on the other end of a connected unix socket, as the kernel recorded it at ``connect``."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return Peer(pid=pid, uid=uid, gid=gid)


def read_request(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One request line and the descriptors that came with it; :class:`ChannelError` if it is malformed."""
    fds: list[int] = []

    def receive() -> bytes:
        data, new_fds, _flags, _addr = socket.recv_fds(sock, 65536, MAX_FDS)
        fds.extend(new_fds)
        return data

    try:
        buf = read_line(
            receive, MAX_REQUEST, lambda: ChannelError(f"request larger than {MAX_REQUEST} bytes; send less", TOO_LARGE)
        )
    except BaseException:
        _close_all(fds)
        raise
    line = buf.split(b"\n", 1)[0]
    try:
        msg = json.loads(line)
    except ValueError:
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
    return {"op": msg["op"], "args": args}, fds


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
            if held:
                server.admission.leave(peer)

    def _serve(self, sock: socket.socket, peer: Peer, fds: list[int]) -> None:
        try:
            msg, fds = read_request(sock)
            handler = self.server.handlers.get(msg["op"])
            if handler is None:
                raise ChannelError(
                    f"unknown operation {msg['op']!r}; known: {', '.join(sorted(self.server.handlers))}", UNKNOWN_OP
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
        try:
            sock.sendall(json.dumps(answer, default=str).encode() + b"\n")
        except OSError:
            pass  # the caller went away; nothing to tell it


class UnixSocketServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
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
    ):
        """``mode`` and ``group``: who may connect at all (the services: 0660, the workspace's group);
        ``admit``, ``limits``: who is served, how much (:class:`Admission`); ``on_refusal``: told of each
        refused connection."""
        self.handlers = handlers
        self.timeout_seconds = timeout_seconds
        self.admission = Admission(limits, admit, name)
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
