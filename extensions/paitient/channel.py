"""The channel between a sandboxed kernel (or a user's server) and the root-side services.

A kernel has no network. It reaches the privacy ledger, the audit trail and the airlock over unix
sockets under ``<state_dir>/run``, bound into the sandbox at the same path. The services identify the
caller by the socket's peer credentials (``SO_PEERCRED``): the kernel says nothing about who it is,
the kernel of user A cannot act in the name of user B.

Wire format: one request per connection, a JSON object ``{"op": ..., "args": {...}}`` ended by a
newline, optionally carrying open file descriptors (``SCM_RIGHTS``) — the airlock takes a file that
way, so the service reads exactly what the caller could open, never a path it chose. The answer is a
JSON object ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "...", "code": "..."}``.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
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

log = logging.getLogger("paitient.channel")

MAX_REQUEST = 1 << 20
MAX_FDS = 4


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a unix socket, as the kernel vouches for it."""

    pid: int
    uid: int
    gid: int

    @property
    def account(self) -> str:
        """The system account name of the caller's uid ('' if the uid has no account)."""
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return ""


class ChannelError(Exception):
    """A request was refused. ``code`` is machine-readable, the message says what to do."""

    def __init__(self, message: str, code: str = "refused"):
        super().__init__(message)
        self.code = code


Handler = Callable[[Peer, dict[str, Any], list[int]], Any]


def peer_of(sock: socket.socket) -> Peer:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return Peer(pid=pid, uid=uid, gid=gid)


def _read_request(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    buf = bytearray()
    fds: list[int] = []
    while b"\n" not in buf:
        data, new_fds, _flags, _addr = socket.recv_fds(sock, 65536, MAX_FDS)
        fds.extend(new_fds)
        if not data:
            break
        buf.extend(data)
        if len(buf) > MAX_REQUEST:
            raise ChannelError(f"request larger than {MAX_REQUEST} bytes", "too_large")
    line = bytes(buf).split(b"\n", 1)[0]
    try:
        msg = json.loads(line)
    except ValueError:
        raise ChannelError("request is not a JSON object", "bad_request") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ChannelError('request must be {"op": "...", "args": {...}}', "bad_request")
    args = msg.get("args", {})
    if not isinstance(args, dict):
        raise ChannelError("args must be a JSON object", "bad_request")
    return {"op": msg["op"], "args": args}, fds


class _RequestHandler(socketserver.BaseRequestHandler):
    server: ChannelServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(self.server.timeout_seconds)
        fds: list[int] = []
        try:
            peer = peer_of(sock)
            msg, fds = _read_request(sock)
            handler = self.server.handlers.get(msg["op"])
            if handler is None:
                raise ChannelError(
                    f"unknown operation {msg['op']!r}; known: {', '.join(sorted(self.server.handlers))}",
                    "unknown_op",
                )
            result = handler(peer, msg["args"], fds)
            answer = {"ok": True, "result": result}
        except ChannelError as e:
            answer = {"ok": False, "error": str(e), "code": e.code}
        except Exception:
            log.exception("%s: request failed", self.server.name)
            answer = {"ok": False, "error": f"internal error in {self.server.name}; see its log", "code": "internal"}
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        try:
            sock.sendall(json.dumps(answer, default=str).encode() + b"\n")
        except OSError:
            pass


class ChannelServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A threaded unix-socket server dispatching ``op`` to handlers that receive the caller's :class:`Peer`."""

    daemon_threads = True
    allow_reuse_address = True
    # Many kernels may call at once (a class starting their training together): a short accept queue
    # makes a connect fail with EAGAIN on a unix socket instead of waiting.
    request_queue_size = 128

    def __init__(
        self,
        path: str | os.PathLike[str],
        handlers: dict[str, Handler],
        *,
        name: str = "service",
        mode: int = 0o666,
        timeout_seconds: float = 30.0,
    ):
        self.path = Path(path)
        self.handlers = handlers
        self.name = name
        self.timeout_seconds = timeout_seconds
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise RuntimeError(f"{self.path} exists and is not a socket; remove it or choose another path")
            self.path.unlink()
        super().__init__(str(self.path), _RequestHandler)
        os.chmod(self.path, mode)

    def start_in_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name=f"{self.name}-channel", daemon=True)
        t.start()
        return t

    def server_close(self) -> None:
        super().server_close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def call(
    path: str | os.PathLike[str],
    op: str,
    args: dict[str, Any] | None = None,
    *,
    fds: list[int] | None = None,
    timeout: float = 60.0,
) -> Any:
    """Send one request to a service and return its result; raise :class:`ChannelError` on refusal."""
    payload = json.dumps({"op": op, "args": args or {}}).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock.connect(str(path))
                break
            except BlockingIOError:
                # the service's accept queue is full for a moment: wait for it, as a blocking connect would
                if time.monotonic() > deadline:
                    raise ChannelError(
                        f"the service at {path} is too busy to answer; try again", "unavailable"
                    ) from None
                time.sleep(0.01)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise ChannelError(
                    f"the service at {path} is not running ({e.strerror}); ask the workspace operator",
                    "unavailable",
                ) from None
        if fds:
            socket.send_fds(sock, [payload], fds)
        else:
            sock.sendall(payload)
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf.extend(chunk)
    if not buf:
        raise ChannelError(f"the service at {path} closed the connection without answering", "unavailable")
    answer = json.loads(buf)
    if not answer.get("ok"):
        raise ChannelError(answer.get("error", "refused"), answer.get("code", "refused"))
    return answer.get("result")
