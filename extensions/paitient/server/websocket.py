"""The kernel websocket connection of the user's server, with the output cap and the execution audit.

Every message between the browser and a kernel passes here, outside the kernel: execute requests are
recorded in the audit trail (``cell.execute`` with the code), and what the kernel sends back is capped
by :mod:`paitient.rules.outputcap`. Configured as ``ServerApp.kernel_websocket_connection_class``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from jupyter_server.services.kernels.connection.base import deserialize_binary_message, deserialize_msg_from_ws_v1
from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection
from traitlets import Unicode

from paitient.config import Server, site_trait
from paitient.rules.outputcap import OutputCap, Verdict, is_protocol, replacement, strip_protocol
from paitient.server.gate import EgressGate

V1 = "v1.kernel.websocket.jupyter.org"
MAX_AUDITED_CODE = 200_000


def _size(part: Any) -> int:
    return len(part.bytes) if hasattr(part, "bytes") else len(part)


class CappedWebsocketConnection(ZMQChannelsWebsocketConnection):
    """ZMQ <-> websocket bridge that caps kernel output and audits executed code."""

    output_cap_message_bytes = site_trait(Server, "output_cap_message_bytes")
    output_cap_execution_bytes = site_trait(Server, "output_cap_execution_bytes")
    audit_run_dir = Unicode(
        "", help="Folder of the services' sockets; empty: executions are not sent to the audit trail."
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pending_audits: set[asyncio.Future[Any]] = set()
        self._outbox: asyncio.Queue[tuple[Any, list[Any]]] | None = None
        self._drainer: asyncio.Future[None] | None = None

    # ---------------------------------------------------------------- browser -> kernel

    def handle_incoming_message(self, incoming_msg: Any) -> None:
        try:
            _channel, header, content = self._peek_incoming(incoming_msg)
        except Exception:
            self.log.warning("Dropping a malformed message from the browser for kernel %s", self.kernel_id)
            return
        # ipykernel runs an execute_request from the control channel as well as from shell.
        if header.get("msg_type") == "execute_request":
            msg_id = str(header.get("msg_id", ""))
            self.cap.note_execute(msg_id)
            self._audit_execute(msg_id, header, content)
        super().handle_incoming_message(incoming_msg)

    def _peek_incoming(self, ws_msg: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
        if self.subprotocol == V1:
            channel, msg_list = deserialize_msg_from_ws_v1(ws_msg)
            header = self.session.unpack(msg_list[0])
            content = self.session.unpack(msg_list[3]) if header.get("msg_type") == "execute_request" else {}
            # (the caller forwards the original bytes; nothing decoded here is sent on)
            return channel or "shell", header, content
        msg = deserialize_binary_message(ws_msg) if isinstance(ws_msg, bytes) else json.loads(ws_msg)
        return msg.get("channel") or "shell", msg.get("header") or {}, msg.get("content") or {}

    def _audit_execute(self, msg_id: str, header: dict[str, Any], content: dict[str, Any]) -> None:
        if not self.audit_run_dir:
            return
        code = content.get("code", "")
        if not isinstance(code, str):
            code = repr(code)
        details = {
            "code": code[:MAX_AUDITED_CODE],
            "truncated": len(code) > MAX_AUDITED_CODE,
            "session": str(header.get("session", "")),
            "msg_id": msg_id,
        }
        # The audit call is a blocking unix-socket round trip: off the event loop, never delaying the kernel.
        fut = asyncio.get_running_loop().run_in_executor(None, self._send_audit, details)
        self._pending_audits.add(fut)
        fut.add_done_callback(self._pending_audits.discard)

    def _send_audit(self, details: dict[str, Any]) -> None:
        try:
            from paitient.server import audit as client

            client.send(self.audit_run_dir, action="cell.execute", object=str(self.kernel_id), details=details)
        except Exception as e:
            self.log.error("could not record an execution of kernel %s in the audit trail: %s", self.kernel_id, e)

    # ---------------------------------------------------------------- kernel -> browser
    #
    # Every message from the kernel goes through the egress gate before the browser gets it. The gate's
    # answer takes a round trip to the egress service, so messages wait in a queue and leave in the order
    # they came, each after its check.

    def handle_outgoing_message(self, stream: Any, outgoing_msg: list[Any]) -> None:
        if self._outbox is None:
            self._outbox = asyncio.Queue()
            self._drainer = asyncio.ensure_future(self._drain())
        self._outbox.put_nowait((stream, outgoing_msg))

    async def _drain(self) -> None:
        assert self._outbox is not None
        while True:
            stream, outgoing = await self._outbox.get()
            try:
                checked = await self._through_gate(outgoing)
            except Exception:
                self.log.exception("Withholding a message from kernel %s: the gate failed on it", self.kernel_id)
                checked = None
            if checked is not None:
                try:
                    super().handle_outgoing_message(stream, checked)
                except Exception:
                    self.log.exception("Could not send a message of kernel %s to the browser", self.kernel_id)

    # The ZMQ connection's own disconnect is synchronous; mypy compares against the async base's abstract one.
    def disconnect(self) -> None:  # type: ignore[override]
        if self._drainer is not None and self._outbox is not None and self._outbox.empty():
            self._drainer.cancel()
            self._drainer, self._outbox = None, None
        super().disconnect()

    def _message(self, msg_type: str, content: dict[str, Any], parent: dict[str, Any]) -> list[Any]:
        return self.session.serialize(self.session.msg(msg_type, content=content, parent=parent))

    async def _through_gate(self, outgoing: list[Any]) -> list[Any] | None:
        """What of ``outgoing`` may reach the browser: the message itself, a replacement, or nothing."""
        gate = self.gate
        _, fed = self.session.feed_identities(outgoing)
        try:
            header = self.session.unpack(fed[1])
            parent = self.session.unpack(fed[2])
            content = self.session.unpack(fed[4])
        except Exception:
            self.log.warning("Dropping a malformed message from kernel %s", self.kernel_id)
            return None
        msg_type = str(header.get("msg_type", ""))
        parent_id = str(parent.get("msg_id", ""))
        cap = self.cap
        execution = cap.key(parent_id)
        if msg_type in REBUILT:
            # Nothing of the kernel's but the protocol's own fields.
            return self._message(msg_type, strip_protocol(msg_type, content), parent)
        size = sum(_size(p) for p in fed[1:])
        verdict = cap.charge(msg_type, parent_id, size)
        if verdict is Verdict.DROP:
            return None
        candidate: list[Any] | None = outgoing
        scan = True
        if verdict is not Verdict.FORWARD:
            new_type, new_content = replacement(verdict, msg_type, content, cap)
            self.log.info(
                "Output cap (%s) on a %s message of %d bytes from kernel %s",
                verdict.value,
                msg_type,
                size,
                self.kernel_id,
            )
            candidate = self._message(new_type, new_content, parent)
            scan = verdict is Verdict.CUT  # a cut message keeps the head of the kernel's text
        if scan and candidate is not None:
            _, parts = self.session.feed_identities(candidate)
            text = _bytes(parts[4]) + b"\n" + _bytes(parts[3])
            binary = b"".join(_bytes(p) for p in parts[5:])
            context = f"kernel:{self.kernel_id}:{execution}"
            check = await gate.check(
                context=context, channel="kernel", object=str(self.kernel_id), text=text, binary=binary
            )
            if not check.forward:
                candidate = self._withheld(msg_type, content, parent, execution, check.notice, cap)
        if msg_type == "execute_reply":
            asyncio.ensure_future(gate.close(f"kernel:{self.kernel_id}:{execution}"))
        return candidate

    def _withheld(
        self,
        msg_type: str,
        content: dict[str, Any],
        parent: dict[str, Any],
        execution: str,
        notice: str,
        cap: OutputCap,
    ) -> list[Any] | None:
        """The first withheld message of an execution becomes its notice; later ones go; replies the
        protocol needs keep only their protocol fields."""
        self.log.info("Egress gate withheld a %s message of kernel %s", msg_type, self.kernel_id)
        if msg_type == "input_request":
            # The kernel waits for an answer: the prompt becomes the notice, the question still stands.
            return self._message(msg_type, {"prompt": notice + "\n> ", "password": False}, parent)
        if is_protocol(msg_type):
            stripped = strip_protocol(msg_type, content)
            if msg_type.endswith("_reply") and stripped.get("status") == "error":
                stripped.update(ename="OutputWithheld", evalue=notice, traceback=[notice])
            return self._message(msg_type, stripped, parent)
        if execution in cap.withheld:
            return None
        cap.withheld.add(execution)
        return self._message("stream", {"name": "stderr", "text": "\n" + notice + "\n"}, parent)

    @property
    def cap(self) -> OutputCap:
        """This kernel's output cap, kept by the gate: a new websocket renews nothing."""
        return self.gate.cap(str(self.kernel_id), self.output_cap_message_bytes, self.output_cap_execution_bytes)

    @property
    def gate(self) -> EgressGate:
        gate = self.websocket_handler.settings.get("paitient_gate")
        if gate is None:
            raise RuntimeError("the egress gate is not configured (the paitient server extension is not loaded)")
        return gate


REBUILT = frozenset({"status", "clear_output"})
"""Message types rebuilt from their protocol fields alone, never checked: they carry no output."""


def _bytes(part: Any) -> bytes:
    if isinstance(part, bytes):
        return part
    if hasattr(part, "bytes"):
        return bytes(part.bytes)
    return bytes(part)
