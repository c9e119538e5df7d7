"""The egress gate of the user's server: every byte that reaches the browser is checked before it goes.

One :class:`EgressGate` per server, created by the server extension. The places that send to the browser
ask it before they send:

- kernel messages on the websocket (:mod:`paitient.server.websocket`),
- file and notebook contents (:mod:`paitient.server.contents`),
- every other HTTP response, through :class:`EgressTransform` (a tornado output transform), with the route
  policy of :mod:`paitient.server.routes` refusing handlers nobody classified.

The gate itself decides nothing about rows or budgets: it sends each piece to the root-side egress service
(:mod:`paitient.services.egress`) over one unix-socket connection and applies the answer. When the service
cannot be reached (or refuses), pieces larger than ``fail_closed_bytes`` are withheld, and the smaller ones
that pass unchecked may add up to ``unchecked_bytes`` for the whole server: the allowance is kept here, so
neither a new websocket nor a new cell renews it; only an answer of the service does.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from tornado.httputil import HTTPHeaders, HTTPServerRequest
from tornado.web import OutputTransform

from paitient.channel import recv_exactly
from paitient.rules.egress import (
    FrameError,
    encode_frame,
    read_header,
    unaskable_notice,
    unchecked,
)
from paitient.rules.outputcap import OutputCap

log = logging.getLogger("paitient.server.gate")

TIMEOUT = 30.0


class GateUnavailable(ConnectionError):
    """The egress service could not be asked."""


@dataclass(frozen=True)
class Check:
    """The gate's answer for one piece of output."""

    forward: bool
    notice: str = ""
    reason: str | None = None
    rows: dict[str, int] | None = None


class _Link:
    """One connection to the egress service, used by one thread at a time; reconnects once on failure."""

    def __init__(self, path: str, timeout: float = TIMEOUT):
        self.path = path
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.lock = threading.Lock()

    def _recv(self, n: int, keep: bool = True) -> bytes:
        assert self.sock is not None
        return recv_exactly(
            self.sock, n, lambda: ConnectionError("the egress service closed the connection"), keep=keep
        )

    def request(self, header: dict[str, Any], payload: bytes = b"") -> dict[str, Any]:
        """The service's answer to one question; :class:`GateUnavailable` when it did not answer. A question
        this gate cannot put (its header over the wire's bound: names the browser chose, too long) raises
        :class:`FrameError`: that is the question's fault, not the service's, and passes nothing unchecked."""
        frame = encode_frame(header, payload)
        with self.lock:
            last: Exception | None = None
            for _ in range(2):
                try:
                    if self.sock is None:
                        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        s.settimeout(self.timeout)
                        s.connect(self.path)
                        self.sock = s
                    self.sock.sendall(frame)
                    head, size = read_header(self._recv)
                    self._recv(size, keep=False)
                    return head
                except (OSError, FrameError) as e:
                    last = e
                    self.close()
            raise GateUnavailable(f"the egress service at {self.path} did not answer: {last}")

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None


class EgressGate:
    """What the server's egress points call. Thread-safe; async callers do not block the event loop."""

    def __init__(self, socket_path: str, *, fail_closed_bytes: int, unchecked_bytes: int):
        self.socket_path = socket_path
        self.fail_closed_bytes = fail_closed_bytes
        self.unchecked_bytes = unchecked_bytes
        self.unchecked_spent = 0
        """Bytes forwarded unchecked since the service last answered."""
        self._unchecked_lock = threading.Lock()
        self._async_link = _Link(socket_path)
        self._sync_link = _Link(socket_path)
        self._caps: dict[str, OutputCap] = {}
        self._caps_lock = threading.Lock()

    # -- per-kernel output caps (kept here, not per websocket: a new connection renews nothing) ----

    def cap(self, kernel_id: str, message_bytes: int, execution_bytes: int) -> OutputCap:
        """The output cap of one kernel, made on first use with the server's configured caps."""
        with self._caps_lock:
            cap = self._caps.get(kernel_id)
            if cap is None:
                cap = self._caps[kernel_id] = OutputCap(message_bytes, execution_bytes)
            return cap

    def forget_kernel(self, kernel_id: str) -> None:
        with self._caps_lock:
            self._caps.pop(kernel_id, None)

    # -- asking the egress service -----------------------------------------------------------

    def _answer(self, head: dict[str, Any], size: int) -> Check:
        if not head.get("ok"):
            log.error("egress service refused a check: %s", head.get("error"))
            return self._unchecked(size)
        with self._unchecked_lock:
            self.unchecked_spent = 0  # the service answers again: the allowance is whole again
        forward = head.get("verdict") == "forward"
        return Check(forward, str(head.get("notice") or ""), head.get("reason"), head.get("rows"))

    def _unchecked(self, size: int) -> Check:
        with self._unchecked_lock:
            refusal = unchecked(size, self.unchecked_spent, self.fail_closed_bytes, self.unchecked_bytes)
            if refusal is None:
                self.unchecked_spent += size
                return Check(True, reason="unchecked")
        log.error("withheld %d bytes unchecked (%d passed unchecked since the last check)", size, self.unchecked_spent)
        return Check(False, refusal.notice, "unchecked")

    @staticmethod
    def _unaskable(size: int, error: FrameError) -> Check:
        """A piece whose question cannot be put: withheld, whatever the unchecked allowance (a 70,000-character
        msg_id made every question of its execution too large, and its whole output passed unchecked)."""
        log.error("withheld %d bytes: the question about them cannot be put to the egress service (%s)", size, error)
        return Check(False, unaskable_notice(), "unaskable")

    @staticmethod
    def _header(context: str, channel: str, obj: str, text: bytes, final: bool = False) -> dict[str, Any]:
        return {
            "op": "check",
            "id": uuid.uuid4().hex[:12],
            "context": context,
            "channel": channel,
            "object": obj,
            "text": len(text),
            "final": final,
        }

    def check_blocking(
        self, *, context: str, channel: str, object: str, text: bytes, binary: bytes = b"", final: bool = False
    ) -> Check:
        """Ask about one piece: ``text`` is scanned for rows, ``text + binary`` counted and hashed.
        ``final``: the piece is the whole output (the service records it at once)."""
        payload = text + binary
        try:
            head = self._sync_link.request(self._header(context, channel, object, text, final), payload)
        except GateUnavailable as e:
            log.error("%s", e)
            return self._unchecked(len(payload))
        except FrameError as e:
            return self._unaskable(len(payload), e)
        return self._answer(head, len(payload))

    async def check(
        self, *, context: str, channel: str, object: str, text: bytes, binary: bytes = b"", final: bool = False
    ) -> Check:
        """:meth:`check_blocking` off the event loop."""
        payload = text + binary
        try:
            head = await asyncio.get_running_loop().run_in_executor(
                None, self._async_link.request, self._header(context, channel, object, text, final), payload
            )
        except GateUnavailable as e:
            log.error("%s", e)
            return self._unchecked(len(payload))
        except FrameError as e:
            return self._unaskable(len(payload), e)
        return self._answer(head, len(payload))

    async def close(self, context: str) -> None:
        """The output of ``context`` is complete: the service records it in the audit trail."""
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, self._async_link.request, {"op": "close", "context": context}
            )
        except (GateUnavailable, FrameError) as e:
            log.error("could not close egress context %s: %s", context, e)

    def close_blocking(self, context: str) -> None:
        try:
            self._sync_link.request({"op": "close", "context": context})
        except (GateUnavailable, FrameError) as e:
            log.error("could not close egress context %s: %s", context, e)

    def shutdown(self) -> None:
        self._async_link.close()
        self._sync_link.close()


# ---------------------------------------------------------------------------------------------------
# Every other HTTP response


IF_OK = "if-ok"
"""A request's tag for a response the output transform lets through untouched when its status is 200 and the
contents manager says it checked that body (:data:`BODY_CHECKED`), and checks otherwise (an error's text may
quote what it read; a model the manager did not build from what it checked is the stock manager's)."""

BODY_CHECKED: contextvars.ContextVar[bool] = contextvars.ContextVar("paitient_body_checked", default=False)
"""Set by the contents manager, in the request's own task, when the model it returns was built from what the
gate passed; read by the output transform of that same request. Nothing else sets it, so a response the
manager did not vouch for (a file that appeared between two looks at its path) is checked like any other."""


class EgressTransform(OutputTransform):
    """Holds back each response body until it is whole, asks the gate, and sends it or a refusal.

    Installed first in the application's transforms, so it sees the body before compression. The route
    policy (:func:`paitient.server.routes.install`) tags each request with its category: static assets of
    the software (JupyterLab's own files) pass untouched, GETs of file contents were checked by the
    contents manager (unless they failed), everything else is checked here.
    """

    def __init__(self, request: HTTPServerRequest):
        super().__init__(request)
        self.request = request
        self.held: list[bytes] = []
        self.status = 200
        self.headers: HTTPHeaders | None = None
        self.passthrough: bool | str = getattr(request, "_paitient_passthrough", False)
        self.gate: EgressGate | None = getattr(request, "_paitient_gate", None)

    def transform_first_chunk(
        self, status_code: int, headers: HTTPHeaders, chunk: bytes, finishing: bool
    ) -> tuple[int, HTTPHeaders, bytes]:
        if self.passthrough == IF_OK:
            self.passthrough = status_code == 200 and BODY_CHECKED.get()
        if self.passthrough or self.gate is None:
            return status_code, headers, chunk
        self.status, self.headers = status_code, headers
        headers.pop("Etag", None)  # the SHA-1 of the body as the handler wrote it, before the gate read it
        if not finishing:
            # A streamed response: nothing of it leaves before the end. Headers go now (tornado sends
            # them with the first flush), so the length is no longer known.
            headers.pop("Content-Length", None)
            self.held.append(chunk)
            return status_code, headers, b""
        body = self._decide(chunk)
        if body is not chunk:
            status_code = 403
            headers["Content-Type"] = "application/json"
            headers["Content-Length"] = str(len(body))
        return status_code, headers, body

    def transform_chunk(self, chunk: bytes, finishing: bool) -> bytes:
        if self.passthrough or self.gate is None:
            return chunk
        self.held.append(chunk)
        if not finishing:
            return b""
        body = b"".join(self.held)
        self.held = []
        return self._decide(body)

    def _decide(self, body: bytes) -> bytes:
        assert self.gate is not None
        if not body:
            return body
        context = f"http:{uuid.uuid4().hex}"
        path = self.request.path[:300]
        check = self.gate.check_blocking(context=context, channel="http", object=path, text=body, final=True)
        if check.forward:
            return body
        import json

        return json.dumps({"message": check.notice, "reason": "egress-withheld"}).encode()
