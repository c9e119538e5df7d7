"""Bytes carried both ways between two connected sockets, for a connection that outlives one call.

The egress gate's connection is one such: a user's server keeps it open and sends frame after frame
(:mod:`paitient.rules.egress`). In a Kubernetes pod the relay carries it to the gateway and the gateway to
the egress service (:mod:`paitient.services.relay`, :mod:`paitient.services.gateway`); neither reads the
frames, the egress service does. :func:`splice` is what both run.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import time
from collections.abc import Callable

CHUNK = 1 << 16
SEND_TIMEOUT = 60.0
"""Seconds a side may refuse to take bytes before the connection is dropped (a peer that stopped reading)."""


def keepalive(sock: socket.socket, idle: int = 60, interval: int = 10, count: int = 3) -> None:
    """TCP keepalive on ``sock``: a peer that vanished without closing (a pod deleted, a node lost) is noticed
    after about ``idle + interval * count`` seconds, and its connection and thread are let go."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


def splice(
    a: socket.socket,
    b: socket.socket,
    *,
    alive: Callable[[], bool] | None = None,
    every: float = 30.0,
) -> str:
    """Copy what either side sends to the other until one closes or fails, or ``alive()`` (asked every
    ``every`` seconds) turns false; why it ended: ``closed``, ``failed`` or ``ended``. The caller closes both."""
    a.settimeout(SEND_TIMEOUT)
    b.settimeout(SEND_TIMEOUT)
    other = {a.fileno(): (a, b), b.fileno(): (b, a)}
    asked = time.monotonic()
    with selectors.DefaultSelector() as sel:
        sel.register(a, selectors.EVENT_READ)
        sel.register(b, selectors.EVENT_READ)
        while True:
            try:
                for key, _ in sel.select(timeout=every):
                    src, dst = other[key.fd]
                    while True:
                        data = src.recv(CHUNK)
                        if not data:
                            return "closed"
                        dst.sendall(data)
                        # a TLS socket may hold decrypted bytes the selector cannot see: take them now
                        if not (isinstance(src, ssl.SSLSocket) and src.pending()):
                            break
            except OSError:
                return "failed"
            if alive is not None and time.monotonic() - asked >= every:
                asked = time.monotonic()
                if not alive():
                    return "ended"
