"""The wire client between a sandboxed kernel (or a user's server, or a root service) and the root-side services.

A kernel has no network. It reaches the privacy ledger, the audit trail and the airlock over unix
sockets under ``<state_dir>/run``, bound into the sandbox at the same path. The services identify the
caller by the socket's peer credentials (``SO_PEERCRED``): the kernel says nothing about who it is,
the kernel of user A cannot act in the name of user B. The serving side is
:mod:`paitient.services.kit.channel`; this module is the standard library only, so that a kernel imports it.

Wire format: one request per connection, a JSON object ``{"op": ..., "args": {...}}`` ended by a
newline, optionally carrying open file descriptors (``SCM_RIGHTS``) — the airlock takes a file that
way, so the service reads exactly what the caller could open, never a path it chose. The answer is a
JSON object ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "...", "code": "..."}`` ended by
a newline. Every refusal, on either side, is a :class:`ChannelError` with one of the codes below.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

MAX_REQUEST = 1 << 20
MAX_ANSWER = 64 << 20
MAX_FDS = 4
RUN_DIR_ENV = "PAITIENT_RUN_DIR"

# The machine-readable codes of :class:`ChannelError`. Services may add their own (``budget_exceeded``).
BAD_REQUEST = "bad_request"
"""The request is malformed or an argument is wrong; the message names it."""
FORBIDDEN = "forbidden"
"""The caller (by its peer credentials) may not do this."""
NOT_FOUND = "not_found"
UNKNOWN_OP = "unknown_op"
TOO_LARGE = "too_large"
UNAVAILABLE = "unavailable"
"""The service is not running, not reachable from here, or too busy to take the connection."""
TIMEOUT = "timeout"
"""The service took longer than the caller's (or its own) time limit."""
BAD_ANSWER = "bad_answer"
"""The service answered something that is not the protocol (a bug or a wrong socket)."""
INTERNAL = "internal"
"""The service failed; its log has the details."""
REFUSED = "refused"
UNKNOWN_CALLER = "unknown_caller"
"""The caller's uid is neither root nor a workspace member in the registry."""
RATE_LIMITED = "rate_limited"
"""The caller's uid sent more requests than its share; wait and try again."""
TOO_MANY_CONNECTIONS = "too_many_connections"
"""The caller's uid (or everyone together) holds as many connections as the service takes at once."""


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a unix socket, as the kernel vouches for it."""

    pid: int
    uid: int
    gid: int
    pod: str = ""
    """For a caller in a user's Kubernetes pod, vouched for by the workspace's gateway: the pod (its token's
    id). Empty for a caller on this machine, known by the socket alone."""
    origin: str = ""
    """For a pod's caller: ``kernel`` (a process the pod's relay sees: a sandboxed kernel) or ``server`` (one in
    another pid namespace: the user's server). Empty for a caller on this machine."""
    start: int | None = None
    """For a pod's caller: its start time as the pod's relay read it (``pid`` is the pid the relay sees)."""
    same_pid_namespace: bool | None = None
    """For a caller on this machine: whether the process that connected shares the service's pid namespace (a
    user's server) or runs in another (a sandboxed kernel), as the kernel answered for that very process when
    the connection was taken; None if it had ended by then."""

    @property
    def delegated(self) -> bool:
        """True for a pod's caller, whose identity the gateway vouched for (the socket's peer is the gateway)."""
        return bool(self.pod)

    @property
    def account(self) -> str:
        """The system account name of the caller's uid ('' if the uid has no account)."""
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return ""

    @property
    def is_root(self) -> bool:
        """A root-side process (a service asking another); what root may do is the service's decision."""
        return self.uid == 0


class ChannelError(Exception):
    """A request was refused or could not be made. ``code`` is machine-readable, the message says what to do."""

    def __init__(self, message: str, code: str = REFUSED):
        super().__init__(message)
        self.code = code

    def to_wire(self) -> dict[str, Any]:
        """The answer that carries this error to the caller."""
        return {"ok": False, "error": str(self), "code": self.code}


def encode_request(op: str, args: Mapping[str, Any] | None = None, on_behalf: Mapping[str, Any] | None = None) -> bytes:
    """One request line; ``on_behalf``: the caller the workspace's gateway speaks for (only the gateway may)."""
    msg: dict[str, Any] = {"op": op, "args": dict(args or {})}
    if on_behalf is not None:
        msg["on_behalf"] = dict(on_behalf)
    return json.dumps(msg).encode() + b"\n"


def decode_answer(raw: bytes, where: str) -> Any:
    """The result of an answer line; a refusal becomes the :class:`ChannelError` the service sent."""
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or "ok" not in answer:
        raise ChannelError(
            f"{where} answered something that is not a paitient service answer; is it the right socket?", BAD_ANSWER
        )
    if not answer["ok"]:
        raise ChannelError(str(answer.get("error") or "refused"), str(answer.get("code") or REFUSED))
    return answer.get("result")


def _connect(sock: socket.socket, path: str, deadline: float) -> None:
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            # the service's accept queue is full for a moment: wait for it, as a blocking connect would
            if time.monotonic() > deadline:
                raise ChannelError(f"the service at {path} is too busy to answer; try again", UNAVAILABLE) from None
            time.sleep(0.01)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise ChannelError(
                f"the service at {path} is not running ({e.strerror}); ask the workspace operator", UNAVAILABLE
            ) from None
        except PermissionError:
            raise ChannelError(
                f"this account may not open the service's socket {path}; ask the workspace operator", UNAVAILABLE
            ) from None


def read_line(receive: Callable[[], bytes], limit: int, too_large: Callable[[], Exception]) -> bytes:
    """What ``receive`` gives up to the first newline, or until it gives nothing (the peer closed).

    Raises ``too_large()`` once more than ``limit`` bytes came without one."""
    buf = bytearray()
    while b"\n" not in buf:
        chunk = receive()
        if not chunk:
            break
        buf.extend(chunk)
        if len(buf) > limit:
            raise too_large()
    return bytes(buf)


def recv_exactly(
    sock: socket.socket, n: int, closed: Callable[[], BaseException], *, keep: bool = True, chunk: int = 1 << 20
) -> bytes:
    """Exactly ``n`` bytes from ``sock``, or ``closed()`` raised once the peer closes before they all came.
    ``keep=False`` drops them as they come (and returns nothing): what must be read, not kept."""
    buf = bytearray()
    left = n
    while left:
        got = sock.recv(min(left, chunk))
        if not got:
            raise closed()
        left -= len(got)
        if keep:
            buf.extend(got)
    return bytes(buf)


def call(
    path: str | os.PathLike[str],
    op: str,
    args: Mapping[str, Any] | None = None,
    *,
    fds: list[int] | None = None,
    timeout: float = 60.0,
    on_behalf: Mapping[str, Any] | None = None,
) -> Any:
    """Send one request to a service and return its result.

    Raises :class:`ChannelError`: the service's own refusal (its code), or ``unavailable`` (not running,
    no access, connection lost), ``timeout`` (no answer within ``timeout`` seconds, connecting included)
    or ``bad_answer``. Nothing else escapes, so a caller handles one exception type.
    """
    where = os.fspath(path)
    payload = encode_request(op, args, on_behalf)
    deadline = time.monotonic() + timeout

    def receive() -> bytes:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        return sock.recv(65536)

    def too_large() -> ChannelError:
        return ChannelError(f"the answer from {where} is larger than {MAX_ANSWER} bytes", BAD_ANSWER)

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            _connect(sock, where, deadline)
            try:
                if fds:
                    socket.send_fds(sock, [payload], fds)
                else:
                    sock.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # a service that refuses a caller answers before reading: its answer is still there to read
            buf = read_line(receive, MAX_ANSWER, too_large)
    except TimeoutError:
        raise ChannelError(
            f"the service at {where} did not answer {op!r} within {timeout:g} s; try again later, and tell the "
            "workspace operator if it keeps happening",
            TIMEOUT,
        ) from None
    except OSError as e:  # the connection broke, or the kernel refused a descriptor or the socket
        raise ChannelError(
            f"could not talk to the service at {where} ({e.strerror or type(e).__name__}); try again, and tell "
            "the workspace operator if it keeps happening",
            UNAVAILABLE,
        ) from None
    if not buf:
        raise ChannelError(f"the service at {where} closed the connection without answering; try again", UNAVAILABLE)
    return decode_answer(buf, where)


class ServiceClient:
    """A thin client of one service's socket ``<run dir>/<service>.sock``; subclasses add one method per operation.

    ``errors`` maps a refusal's code to the exception class a caller catches (each a :class:`ChannelError`);
    other codes raise :attr:`error_class`. The run directory defaults to ``$PAITIENT_RUN_DIR``, which the
    workspace sets in every kernel and user server; root-side callers pass the site's ``run_dir``.
    """

    service: ClassVar[str] = ""
    default_timeout: ClassVar[float] = 60.0
    error_class: ClassVar[type[ChannelError]] = ChannelError
    errors: ClassVar[Mapping[str, type[ChannelError]]] = {}
    outside_hint: ClassVar[str] = "Work inside a paitient kernel (the workspace sets it)"
    """What to do when ``$PAITIENT_RUN_DIR`` is not set (the start of a sentence)."""

    def __init__(self, run_dir: str | os.PathLike[str] | None = None, *, timeout: float | None = None):
        if run_dir is None:
            run_dir = os.environ.get(RUN_DIR_ENV, "")
            if not run_dir:
                raise self.error(
                    ChannelError(
                        f"{RUN_DIR_ENV} is not set, so the {self.service} service cannot be reached. "
                        f"{self.outside_hint}, or pass run_dir=... explicitly.",
                        UNAVAILABLE,
                    )
                )
        self.path = Path(run_dir) / f"{self.service}.sock"
        self.timeout = self.default_timeout if timeout is None else timeout

    def error(self, e: ChannelError) -> ChannelError:
        """The exception to raise for a refusal: the class ``errors`` names for its code, same message and code."""
        cls = self.errors.get(e.code, self.error_class)
        return e if type(e) is cls else cls(str(e), e.code)

    def call(self, op: str, args: Mapping[str, Any] | None = None, *, fds: list[int] | None = None) -> Any:
        try:
            return call(self.path, op, args, fds=fds, timeout=self.timeout)
        except ChannelError as e:
            raise self.error(e) from None
