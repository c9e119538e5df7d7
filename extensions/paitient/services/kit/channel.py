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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from paitient.channel import (
    BAD_REQUEST,
    INTERNAL,
    MAX_FDS,
    MAX_REQUEST,
    TIMEOUT,
    TOO_LARGE,
    UNKNOWN_OP,
    ChannelError,
    Peer,
    read_line,
)

log = logging.getLogger("paitient.services.kit.channel")

Handler = Callable[[Peer, dict[str, Any], list[int]], Any]


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
        try:
            peer = peer_of(sock)
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
    ):
        self.path = Path(path)
        self.name = name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise RuntimeError(f"{self.path} exists and is not a socket; remove it or choose another path")
            self.path.unlink()
        super().__init__(str(self.path), handler)
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
        timeout_seconds: float = 30.0,
    ):
        self.handlers = handlers
        self.timeout_seconds = timeout_seconds
        super().__init__(path, _RequestHandler, name=name, mode=mode)
