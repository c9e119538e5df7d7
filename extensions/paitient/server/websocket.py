"""The kernel websocket connection of the user's server, with the output cap and the execution audit.

Every message between the browser and a kernel passes here, outside the kernel: execute requests are
recorded in the audit trail (``cell.execute`` with the code and the ``user_expressions``, which IPython
evaluates too), and what the kernel sends back is capped by :mod:`paitient.rules.outputcap`. Configured as
``ServerApp.kernel_websocket_connection_class``.

Only ``execute_request`` carries code for the kernel to run, whatever its ``silent`` and ``store_history``
(both are recorded alike), and on shell or control. The other requests run none the trail has not seen:
``comm_open``/``comm_msg`` reach only handlers an audited cell registered; ``complete_request`` evaluates
only under IPython's ``limited`` policy (allow-listed types, no user-defined attribute code) and jedi's
static lookups; ``inspect_request`` may run a property or
``__getattr__`` of an object, code an audited cell defined; ``is_complete_request`` only parses; and the
kernel starts without its debugger (:mod:`paitient.kernel.start`), so ``debug_request`` evaluates nothing.

Auditing fails closed: an ``execute_request`` reaches the kernel only after the audit service has answered
that its record is written. When it cannot be written (the service is down, too slow, or refuses), the
request is dropped and the browser gets what a failed cell gets (an ``error`` on iopub and an
``execute_reply`` with status ``error``) saying so; the next cell tries again, so execution resumes as soon
as the service is back. Messages from the browser keep their order: one that comes while an execution is
being recorded waits for it.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from typing import Any

from jupyter_server.services.kernels.connection.base import deserialize_binary_message, deserialize_msg_from_ws_v1
from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection
from traitlets import Float, Unicode

from paitient.config import Server, site_trait
from paitient.rules.egress import looks_like_text
from paitient.rules.outputcap import (
    TRACKED_REQUESTS,
    OutputCap,
    Verdict,
    message_type,
    replacement,
    strip_protocol,
)
from paitient.rules.shown import merged_streams
from paitient.server.gate import EgressGate
from paitient.server.outputlines import OutputLines

V1 = "v1.kernel.websocket.jupyter.org"
MAX_AUDITED_CODE = 200_000
MAX_MSG_ID = 256
"""The longest msg_id a browser's message may have (JupyterLab's are a UUID and a count, under 80)."""


def _size(part: Any) -> int:
    return len(part.bytes) if hasattr(part, "bytes") else len(part)


class CappedWebsocketConnection(ZMQChannelsWebsocketConnection):
    """ZMQ <-> websocket bridge that caps kernel output and audits executed code."""

    output_cap_message_bytes = site_trait(Server, "output_cap_message_bytes")
    output_cap_execution_bytes = site_trait(Server, "output_cap_execution_bytes")
    audit_run_dir = Unicode(
        "", help="Folder of the services' sockets; empty: executions are not sent to the audit trail."
    ).tag(config=True)
    audit_timeout = Float(
        5.0, help="Seconds to wait for the audit service to record an execution before refusing to run it."
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._inbox: asyncio.Queue[Any] | None = None
        self._receiver: asyncio.Future[None] | None = None
        self._outbox: asyncio.Queue[tuple[Any, list[Any]]] | None = None
        self._drainer: asyncio.Future[None] | None = None
        self._lines = OutputLines()
        """What this connection's JupyterLab shows of each output area's stream line, as far as it knows."""
        self._rate_notices: list[str] = []
        self._own_statuses: set[str] = set()
        """Statuses this connection made itself (for a cell it refused), by their message ids."""
        self._statuses: OrderedDict[str, None] = OrderedDict()
        """The kernel's status messages (by its message id) this connection sent on: each at most once."""

    # ---------------------------------------------------------------- browser -> kernel

    def handle_incoming_message(self, incoming_msg: Any) -> None:
        if self._inbox is None:
            self._inbox = asyncio.Queue()
            self._receiver = asyncio.ensure_future(self._receive())
        self._inbox.put_nowait(incoming_msg)

    async def _receive(self) -> None:
        assert self._inbox is not None
        while True:
            incoming = await self._inbox.get()
            try:
                await self._incoming(incoming)
            except Exception:
                self.log.exception("Dropping a message from the browser for kernel %s: it failed here", self.kernel_id)

    async def _incoming(self, incoming_msg: Any) -> None:
        try:
            channel, header, content = self._peek_incoming(incoming_msg)
        except Exception:
            self.log.warning("Dropping a malformed message from the browser for kernel %s", self.kernel_id)
            return
        msg_id = str(header.get("msg_id", ""))
        if len(msg_id) > MAX_MSG_ID:
            # it would name its outputs' questions to the egress service, and those would be too long to put
            self.log.warning(
                "Dropping a message from the browser for kernel %s: its msg_id has %d characters (at most %d)",
                self.kernel_id,
                len(msg_id),
                MAX_MSG_ID,
            )
            return
        if msg_id not in self.cap.requests:
            # its output area shows nothing yet (a msg_id sent again names an area JupyterLab may show a
            # line in, which this connection need not have followed)
            self._lines.requested(msg_id)
        self.cap.note_request(header)  # the parent the kernel's answers to it go out with
        # ipykernel runs an execute_request from the control channel as well as from shell.
        if header.get("msg_type") == "execute_request":
            self.cap.note_execute(msg_id)
            refusal = await self._audit_execute(msg_id, header, content)
            if refusal:
                self._refuse_execute(channel, header, refusal)
                return
        self.cap.forwarded(channel, header)  # its statuses are due in this order
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

    async def _audit_execute(self, msg_id: str, header: dict[str, Any], content: dict[str, Any]) -> str:
        """Record the execution in the audit trail; '' when recorded, else the notice for the browser."""
        if not self.audit_run_dir:
            return ""
        code = _text(content.get("code", ""))
        expressions, cut = audited_expressions(content.get("user_expressions"), MAX_AUDITED_CODE - len(code))
        details = {
            "code": code[:MAX_AUDITED_CODE],
            # IPython evaluates each of these after the code, in the user's namespace: they are code too.
            "user_expressions": expressions,
            "truncated": len(code) > MAX_AUDITED_CODE or cut,
            "session": str(header.get("session", "")),
            "msg_id": msg_id,
        }
        # A blocking unix-socket round trip: off the event loop, so other kernels' traffic goes on meanwhile.
        return await asyncio.get_running_loop().run_in_executor(None, self._send_audit, details)

    def _send_audit(self, details: dict[str, Any]) -> str:
        from paitient.server import audit as client

        try:
            client.send(
                self.audit_run_dir,
                action="cell.execute",
                object=str(self.kernel_id),
                details=details,
                timeout=self.audit_timeout,
            )
        except client.AuditError as e:
            self.log.error("Refused an execution of kernel %s: it could not be audited: %s", self.kernel_id, e)
            return audit_refusal(e.code)
        except Exception as e:
            self.log.exception("Refused an execution of kernel %s: auditing it failed", self.kernel_id)
            return audit_refusal(type(e).__name__)
        return ""

    def _refuse_execute(self, channel: str, request: dict[str, Any], notice: str) -> None:
        """What a failed cell sends, from here instead of the kernel: busy, the error, the reply, idle."""
        error = {"ename": "AuditUnavailable", "evalue": notice, "traceback": [notice]}
        reply: dict[str, Any] = {
            "status": "error",
            "execution_count": None,
            "user_expressions": {},
            "payload": [],
            **error,
        }

        def own_status(state: str) -> list[Any]:
            # the server's own: not held to the order the kernel's statuses keep (the kernel never had it)
            msg = self.session.msg("status", content={"execution_state": state}, parent=request)
            self._own_statuses.add(msg["header"]["msg_id"])
            return list(self.session.serialize(msg))

        busy, idle = own_status("busy"), own_status("idle")
        self.handle_outgoing_message("iopub", busy)
        self.handle_outgoing_message("iopub", self._message("error", error, request))
        self.handle_outgoing_message(
            channel if channel in ("shell", "control") else "shell", self._message("execute_reply", reply, request)
        )
        self.handle_outgoing_message("iopub", idle)

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

    def _over_rate(self, channel: Any, candidate: list[Any]) -> bool:
        """Whether jupyter_server's IOPub rate limit (``limit_rate``, ``iopub_msg_rate_limit``,
        ``iopub_data_rate_limit``) drops ``candidate``, what the browser would get of a kernel's message (after
        the output cap). It applies here, before the gate reads the message into an output area's line, so a
        message it drops changes nothing the server follows: the stock connection applies it to what is about
        to be sent, and the browser's line could then differ from the gate's. When it starts dropping, its
        notice waits in :attr:`_rate_notices`."""
        _, fed = self.session.feed_identities(candidate)
        blank: dict[str, Any] = {"header": None, "parent_header": None, "content": None}
        return bool(ZMQChannelsWebsocketConnection._limit_rate(self, channel, blank, fed[1:]))

    def _limit_rate(self, channel: Any, msg: Any, msg_list: Any) -> bool:
        """Not again as the message leaves: :meth:`_over_rate` applied it before the gate."""
        return False

    def write_stderr(self, error_message: str, parent_header: Any) -> None:
        """The rate limit's notice that it drops messages from now on: it takes the place of the message it
        drops first, and goes through the gate as that message would have (the stock connection sent it at
        once, under the parent header it had)."""
        self.log.warning(error_message)
        self._rate_notices.append(error_message + "\n")

    async def _drain(self) -> None:
        assert self._outbox is not None
        while True:
            stream, outgoing = await self._outbox.get()
            try:
                channel = stream if isinstance(stream, str) else getattr(stream, "channel", None)
                checked = await self._through_gate(outgoing, channel)
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
        if self._receiver is not None:
            self._receiver.cancel()
            self._receiver, self._inbox = None, None
        if self._drainer is not None and self._outbox is not None and self._outbox.empty():
            self._drainer.cancel()
            self._drainer, self._outbox = None, None
        super().disconnect()

    def _message(self, msg_type: str, content: dict[str, Any], parent: dict[str, Any]) -> list[Any]:
        return self.session.serialize(self.session.msg(msg_type, content=content, parent=parent))

    def _forwarded(
        self, msg_type: str, parent: dict[str, Any], metadata: Any, content: dict[str, Any], fed: list[Any]
    ) -> list[Any]:
        """A kernel's message as the browser gets it: a header of this server's session, the client's own
        ``parent``, and the kernel's metadata (a mapping, else none), content and buffers, which the gate reads.
        Metadata and content are the values the kernel sent, written anew by this server's packer (JSON,
        non-ASCII characters as UTF-8): never the kernel's own bytes, whose JSON may spell any character as an
        escape (``\\u0031`` for ``1``) that the browser reads as the character."""
        msg = self.session.msg(
            msg_type, content=content, parent=parent, metadata=metadata if isinstance(metadata, dict) else {}
        )
        return [*self.session.serialize(msg), *fed[5:]]

    async def _through_gate(self, outgoing: list[Any], channel: str | None = "iopub") -> list[Any] | None:
        """What of ``outgoing`` (from the kernel's ``channel``) may reach the browser: the message under a
        header of the server's, a replacement, or nothing."""
        gate = self.gate
        _, fed = self.session.feed_identities(outgoing)
        try:
            header = self.session.unpack(fed[1])
            raw_parent = self.session.unpack(fed[2])
            metadata = self.session.unpack(fed[3])
            content = self.session.unpack(fed[4])
        except Exception:
            self.log.warning("Dropping a malformed message from kernel %s", self.kernel_id)
            return None
        msg_type = message_type(header)
        if msg_type is None or not isinstance(content, dict):
            self.log.warning("Dropping a message of kernel %s that is not of the protocol's form", self.kernel_id)
            return None
        # Outputs a message carries as a list (an Output widget's state) go joined as JupyterLab joins them:
        # a value cut in two at an output's end is one value for the gate, as on the screen.
        content = merged_streams(content)
        cap = self.cap
        parent = cap.parent(raw_parent)
        parent_id = parent.get("msg_id", "")
        lines = self._lines
        area = lines.area(parent_id)
        if msg_type == "stream" and isinstance(content.get("text"), str) and lines.unknown(area):
            # a line this connection did not follow may show there (a cell running across a reconnect, an
            # area let go of): the message starts a line of its own, in the browser as here
            content = {**content, "text": "\n" + content["text"]}
        execution = cap.key(parent_id)
        if execution != cap.current and execution in cap.answered:
            # Output of an execution that has ended (its reply went on): the kernel is running another one now,
            # and what it sends counts against that one, so no ended execution opens a fresh budget of rows or
            # bytes. (Late output of the latest one counts on from what it showed: the egress service keeps it.)
            execution = cap.current
        if msg_type.endswith("_reply") and not cap.first_reply(parent_id, msg_type):
            self.log.info("Dropping a %s of kernel %s: it answers no request of a client", msg_type, self.kernel_id)
            return None
        candidate: list[Any] | None
        scan = True
        sent_type, sent_content = msg_type, content
        if msg_type in REBUILT:
            # Nothing of the kernel's but the protocol's own fields, and those only in the protocol's order: a
            # status for each request in turn, a clear_output of what runs now (rules/outputcap.py).
            sent_content = strip_protocol(msg_type, content)
            if msg_type == "status":
                message_id = header.get("msg_id") if isinstance(header.get("msg_id"), str) else ""
                if message_id in self._own_statuses:
                    self._own_statuses.discard(message_id)
                elif message_id in self._statuses or not cap.status(
                    message_id, parent_id, sent_content["execution_state"]
                ):
                    return None  # out of the protocol's order, or this connection had it already
                self._statuses[message_id] = None
                while len(self._statuses) > TRACKED_REQUESTS:
                    self._statuses.popitem(last=False)
            if msg_type == "clear_output" and not cap.may_clear(parent_id):
                return None
            # a status is not checked (one for each request); a clear_output is, as an output: its bytes count
            candidate, scan = self._message(msg_type, sent_content, parent), msg_type == "clear_output"
        else:
            size = sum(_size(p) for p in fed[1:])
            verdict = cap.charge(msg_type, execution, size)
            if verdict is Verdict.DROP:
                return None
            if verdict is Verdict.FORWARD:
                candidate = self._forwarded(msg_type, parent, metadata, content, fed)
            else:
                new_type, new_content = replacement(verdict, msg_type, content, cap)
                sent_type, sent_content = new_type, new_content
                self.log.info(
                    "Output cap (%s) on a %s message of %d bytes from kernel %s",
                    verdict.value,
                    msg_type,
                    size,
                    self.kernel_id,
                )
                candidate = self._message(new_type, new_content, parent)
                scan = verdict is Verdict.CUT  # a cut message keeps the head of the kernel's text
        if self._over_rate(channel, candidate):
            if not self._rate_notices:
                return None  # dropped: the browser never sees it, and nothing it shows changes
            sent_type, sent_content = "stream", {"name": "stderr", "text": self._rate_notices.pop()}
            self._rate_notices.clear()
            candidate, scan = self._message(sent_type, sent_content, parent), True
        elif msg_type == "status":
            return candidate
        if scan and candidate is not None:
            _, parts = self.session.feed_identities(candidate)
            # Binary buffers (comm messages, display data) that hold text are scanned with the content;
            # the others (images, packed numbers) are counted only.
            buffers = [(b, looks_like_text(b)) for b in map(_bytes, parts[5:])]
            # A stream's message goes on from where the cell's last one left it: what it makes JupyterLab
            # show (a value written over another, a row printed a value at a time) is read with it.
            shown, line = lines.shown(area, sent_type, sent_content)
            # (as JSON, as the rest: the service undoes JSON's escapes, which a shown text may spell literally)
            region = [json.dumps(shown, ensure_ascii=False).encode("utf-8", "surrogatepass")] if shown else []
            texts = [_bytes(parts[4]), _bytes(parts[3]), *(b for b, t in buffers if t), *region]
            text = b"\n".join(texts)
            binary = b"".join(b for b, t in buffers if not t)
            context = f"kernel:{self.kernel_id}:{execution}"
            check = await gate.check(
                context=context, channel="kernel", object=str(self.kernel_id), text=text, binary=binary
            )
            if check.forward:
                lines.note_widget(sent_type, sent_content)
                if sent_type == "clear_output":
                    lines.cleared(area)
            else:
                candidate = self._withheld(msg_type, content, parent, execution, check.notice, cap)
            # a withheld message's notice starts an output; one dropped after it (the execution's notice went
            # already) changes nothing the browser shows
            lines.note_output(area, sent_type if check.forward else "withheld" if candidate else "dropped", line)
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
        if msg_type.endswith("_reply"):
            stripped = strip_protocol(msg_type, content)
            if stripped.get("status") == "error":
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


def _text(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def audited_expressions(expressions: Any, room: int) -> tuple[dict[str, str], bool]:
    """The ``user_expressions`` of an execute_request as the audit trail records them (name -> the
    expression's text), within ``room`` characters in all; and whether any was cut to fit.

    Whatever the browser sent is recorded, well-formed or not: a value that is not a string, or a mapping
    that is not one, is recorded as its ``repr`` (IPython evaluates nothing of those, but the trail shows
    what was asked)."""
    if not expressions:
        return {}, False
    if not isinstance(expressions, dict):
        expressions = {"(not a mapping)": expressions}
    out: dict[str, str] = {}
    cut = False
    room = max(room, 0)
    for name, expression in expressions.items():
        if room <= 0:
            return out, True
        key, text = _text(name)[:200], _text(expression)
        kept = text[: max(room - len(key), 0)]
        cut = cut or len(kept) < len(text)
        out[key] = kept
        room -= len(key) + len(kept)
    return out, cut


def audit_refusal(code: str) -> str:
    """What the browser is told when an execution could not be recorded (``code``: the audit client's)."""
    if code in ("rate_limited", "too_many_connections"):
        why = "this account is sending executions faster than the audit trail takes them; wait a moment"
    else:
        why = f"the audit service could not record it ({code}); try again in a moment"
    return (
        f"This cell was not run: every execution is recorded in the audit trail before it runs, and {why}, then "
        "run the cell again. Nothing was lost: your kernel and its variables are as they were. If this keeps "
        "happening, tell the workspace operator that auditing is down."
    )


REBUILT = frozenset({"status", "clear_output"})
"""Message types rebuilt from their protocol fields alone, in the protocol's order; a status is not checked."""


def _bytes(part: Any) -> bytes:
    if isinstance(part, bytes):
        return part
    if hasattr(part, "bytes"):
        return bytes(part.bytes)
    return bytes(part)
