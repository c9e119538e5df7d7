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
from paitient.rules.outputcap import OutputCap, Verdict, replacement

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

    _cap: OutputCap | None = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pending_audits: set[asyncio.Future[Any]] = set()

    @property
    def cap(self) -> OutputCap:
        if self._cap is None:
            self._cap = OutputCap(self.output_cap_message_bytes, self.output_cap_execution_bytes)
        return self._cap

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

    def handle_outgoing_message(self, stream: Any, outgoing_msg: list[Any]) -> None:
        _, fed = self.session.feed_identities(outgoing_msg)
        try:
            header = self.session.unpack(fed[1])
            parent = self.session.unpack(fed[2])
        except Exception:
            self.log.warning("Dropping a malformed message from kernel %s", self.kernel_id)
            return
        msg_type = str(header.get("msg_type", ""))
        size = sum(_size(p) for p in fed[1:])
        verdict = self.cap.charge(msg_type, str(parent.get("msg_id", "")), size)
        if verdict is Verdict.FORWARD:
            super().handle_outgoing_message(stream, outgoing_msg)
            return
        if verdict is Verdict.DROP:
            return
        try:
            content = self.session.unpack(fed[4])
        except Exception:
            content = {}
        new_type, new_content = replacement(verdict, msg_type, content, self.cap)
        self.log.info(
            "Output cap (%s) on a %s message of %d bytes from kernel %s", verdict.value, msg_type, size, self.kernel_id
        )
        msg = self.session.msg(new_type, content=new_content, parent=parent)
        super().handle_outgoing_message(stream, self.session.serialize(msg))
