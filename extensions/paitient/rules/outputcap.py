"""The output cap: how much a kernel may send to the browser, decided outside the kernel.

Pure logic, no I/O. :class:`OutputCap` keeps the byte count of each execution the *server* saw a client
ask for (an ``execute_request`` passing through the server), so a kernel cannot open fresh budgets by
inventing parent ids: a message whose parent is not one of those executions is charged to the latest
one. :func:`verdict` decides per message; :func:`replacement` builds what the browser gets instead.

Nothing of a kernel's message header reaches the browser: the server sends each message on under a header
of its own, with the kernel's message type only when it is a plain type name (:func:`message_type`), and as
its parent the header the client itself sent with the request the kernel names (:meth:`OutputCap.parent`),
so neither can carry what the gate did not read.

Rules:
- a message larger than ``message_bytes`` is cut (stream text keeps its head) or replaced by a notice;
- once an execution has sent ``execution_bytes``, its next output message becomes one notice and every
  later one is dropped; status messages and replies (which the protocol needs) still pass, stripped to
  their protocol fields so they cannot carry data (:func:`strip_protocol`);
- a reply goes on only as the first reply, of the matching type, to a request a client sent
  (:meth:`OutputCap.first_reply`): the protocol has one, and a kernel that sent more, or replies nobody
  asked for, could otherwise make each stripped reply carry a little past the cap.
"""

from __future__ import annotations

import enum
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_TYPES = frozenset({"status", "clear_output", "shutdown_reply"})
"""Messages the protocol needs even past the cap (with every ``*_reply``), stripped to fields that carry none of
the kernel's values. A ``comm_close`` is not one: its comm id is the kernel's, so past the cap it is dropped."""
MAX_STARTS = 64
"""``starting`` statuses of no request a kernel's messages may carry to the browser (one each time its process
starts); the rest are dropped."""
TRACKED_EXECUTIONS = 256
TRACKED_REQUESTS = 4096
"""Requests of clients whose headers are kept, the latest, to be the parent of the kernel's answers."""
REQUEST_FIELDS = ("msg_id", "msg_type", "session", "username", "date", "version", "subshell_id")
"""The fields of a client's request header its answers carry back; each kept only as a string of at most
:data:`REQUEST_FIELD_CHARS` characters."""
REQUEST_FIELD_CHARS = 256
MESSAGE_TYPE = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")
CUT_OVERHEAD = 1024
"""Bytes a cut message carries besides the kept text (headers and the notice)."""
NOTICE = (
    "[paitient] output cut: {what} exceeded {limit:,} bytes. Large results stay in the workspace; "
    "summarise them, or request an export through the airlock."
)


class Verdict(enum.Enum):
    FORWARD = "forward"
    CUT = "cut"
    """Over the per-message cap: truncate or replace with a notice."""
    NOTICE = "notice"
    """First output over the per-execution cap: replace with a notice."""
    STRIP = "strip"
    """Over the per-execution cap, but the protocol needs it: keep only protocol fields."""
    DROP = "drop"


def message_type(header: Any) -> str | None:
    """The message type of a kernel's header, when it is a plain type name (lower-case letters, digits and
    underscores, at most 64); else None, and the message does not go on."""
    msg_type = header.get("msg_type") if isinstance(header, dict) else None
    return msg_type if isinstance(msg_type, str) and MESSAGE_TYPE.match(msg_type) else None


def is_protocol(msg_type: str) -> bool:
    return msg_type in PROTOCOL_TYPES or msg_type.endswith("_reply")


@dataclass
class OutputCap:
    message_bytes: int
    execution_bytes: int
    executions: OrderedDict[str, int] = field(default_factory=OrderedDict)
    noticed: set[str] = field(default_factory=set)
    withheld: set[str] = field(default_factory=set)
    """Executions whose output the egress gate withheld (their notice was sent)."""
    current: str = ""
    requests: OrderedDict[str, dict[str, str]] = field(default_factory=OrderedDict)
    """The headers (:data:`REQUEST_FIELDS`) of the latest requests clients sent the kernel, by message id."""
    answered: set[str] = field(default_factory=set)
    """The requests of :attr:`requests` a reply went on to."""
    queues: dict[str, list[str]] = field(default_factory=dict)
    """The requests a client sent on to the kernel that have had no ``idle`` status yet, oldest first, per
    channel and subshell: a kernel works through each in order, so their statuses come in that order."""
    busy: set[str] = field(default_factory=set)
    """The requests at the head of :attr:`queues` whose ``busy`` status went on."""
    starts: int = 0
    """``starting`` statuses of no request (a kernel process starting) seen."""
    decided: OrderedDict[str, tuple[str, str, bool]] = field(default_factory=OrderedDict)
    """The latest statuses decided, by the kernel's message id: every connection to the kernel gets each status
    (iopub goes to all), and the first to see it decides for all."""

    def note_request(self, header: Any) -> None:
        """A client sent the kernel a message with ``header``: the kernel's answers to it get that header back
        as their parent (the client's own bytes, whatever the kernel writes into theirs)."""
        if not isinstance(header, dict):
            return
        fields = {k: v for k in REQUEST_FIELDS if isinstance(v := header.get(k), str) and len(v) <= REQUEST_FIELD_CHARS}
        msg_id = fields.get("msg_id")
        if not msg_id:
            return
        self.requests[msg_id] = fields
        self.requests.move_to_end(msg_id)
        while len(self.requests) > TRACKED_REQUESTS:
            old, _ = self.requests.popitem(last=False)
            self.answered.discard(old)

    def parent(self, parent_header: Any) -> dict[str, str]:
        """The parent header a kernel's message goes on with: the header a client sent with the request that
        ``parent_header`` names, or none when no client of this server sent it (the kernel's own messages,
        or a request too old to be kept). Nothing the kernel wrote into ``parent_header`` is kept."""
        msg_id = parent_header.get("msg_id") if isinstance(parent_header, dict) else None
        return dict(self.requests.get(msg_id, {})) if isinstance(msg_id, str) else {}

    def first_reply(self, parent_id: str, msg_type: str) -> bool:
        """Whether a reply of ``msg_type`` to ``parent_id`` goes on: the first reply to a request a client
        sent that is still kept, of the type that answers it (``x_reply`` to ``x_request``); not a second
        one, nor one to a request no client of this server sent."""
        request = self.requests.get(parent_id)
        if request is None or parent_id in self.answered:
            return False
        if request.get("msg_type") != msg_type.removesuffix("_reply") + "_request":
            return False
        self.answered.add(parent_id)
        return True

    def forwarded(self, channel: str, header: Any) -> None:
        """A client's request (``header``) went on to the kernel on ``channel``: its statuses are due after
        those of the requests sent before it on the same channel and subshell."""
        if not isinstance(header, dict):
            return
        msg_id = header.get("msg_id")
        if not isinstance(msg_id, str) or msg_id not in self.requests:
            return
        subshell = header.get("subshell_id")
        queue = self.queues.setdefault(f"{channel}/{subshell if isinstance(subshell, str) else ''}", [])
        queue.append(msg_id)
        if len(queue) > TRACKED_REQUESTS:
            self.busy.discard(queue.pop(0))

    def status(self, message_id: str, parent_id: str, state: str) -> bool:
        """:meth:`decide_status` once per status message (``message_id``, the kernel's): what another connection
        to the kernel decided for the same message holds for this one, and a message id the kernel sends again
        with another parent or state goes nowhere."""
        if not message_id:
            return False
        seen = self.decided.get(message_id)
        if seen is not None:
            return seen == (parent_id, state, True)
        ok = self.decide_status(parent_id, state)
        self.decided[message_id] = (parent_id, state, ok)
        while len(self.decided) > TRACKED_REQUESTS:
            self.decided.popitem(last=False)
        return ok

    def decide_status(self, parent_id: str, state: str) -> bool:
        """Whether a kernel's status of ``state`` for the request ``parent_id`` goes on: one ``busy``, then one
        ``idle``, for each request a client sent on, in the order they were sent on each channel (a status for a
        later request means the kernel passed over the ones before it: they get none). Its parent and its state
        were the kernel's free choice in every status, never checked: one byte of a table per status, a parent
        named from 256 requests the browser had sent. Now a status says no more than whether, and when, the
        kernel answered each request. Of no request, only ``starting`` goes on (a kernel process starting, which
        ends what the one before left unanswered), at most :data:`MAX_STARTS` times."""
        if not parent_id:
            if state != "starting":
                return False
            self.queues.clear()
            self.busy.clear()
            self.starts += 1
            return self.starts <= MAX_STARTS
        for queue in self.queues.values():
            if parent_id in queue:
                break
        else:
            return False  # no request on its way, or one that had its idle
        skipped = queue.index(parent_id)
        for passed in queue[:skipped]:
            self.busy.discard(passed)
        del queue[:skipped]
        if state == "busy":
            if parent_id in self.busy:
                return False
            self.busy.add(parent_id)
            return True
        if state == "idle":
            queue.pop(0)
            self.busy.discard(parent_id)
            return True
        return False

    def may_clear(self, parent_id: str) -> bool:
        """Whether a ``clear_output`` naming ``parent_id`` goes on: of the latest execution, of a request the
        kernel is working on now (busy, at the head of its queue: a widget's callback), or of none; not of any
        other request a client once sent, which would make the parent a choice of the kernel's."""
        if parent_id in ("", self.current):
            return True
        return parent_id in self.busy and any(q and q[0] == parent_id for q in self.queues.values())

    def note_execute(self, msg_id: str) -> None:
        """A client's execute_request went to the kernel: it opens a new budget."""
        self.executions[msg_id] = 0
        self.executions.move_to_end(msg_id)
        self.current = msg_id
        while len(self.executions) > TRACKED_EXECUTIONS:
            old, _ = self.executions.popitem(last=False)
            self.noticed.discard(old)
            self.withheld.discard(old)

    def key(self, parent_id: str) -> str:
        """The execution an outgoing message is charged to: its parent if the server saw that request,
        else the latest one (a kernel cannot open budgets by inventing parent ids)."""
        return parent_id if parent_id in self.executions else self.current

    def charge(self, msg_type: str, parent_id: str, size: int) -> Verdict:
        """Count ``size`` bytes of an outgoing message against its execution; say what to do with it."""
        key = self.key(parent_id)
        # A message over the per-message cap is cut to half of it: only that much leaves.
        forwarded = size if size <= self.message_bytes else self.message_bytes // 2 + CUT_OVERHEAD
        used = self.executions.get(key, 0) + forwarded
        self.executions[key] = used
        if used > self.execution_bytes:
            if is_protocol(msg_type):
                return Verdict.STRIP
            if key in self.noticed:
                return Verdict.DROP
            self.noticed.add(key)
            return Verdict.NOTICE
        if size > self.message_bytes:
            return Verdict.CUT
        return Verdict.FORWARD


def notice_text(what: str, limit: int) -> str:
    return NOTICE.format(what=what, limit=limit)


KERNEL_INFO: dict[str, Any] = {
    "status": "ok",
    "protocol_version": "5.3",
    "implementation": "ipython",
    "language_info": {
        "name": "python",
        "version": "{}.{}.{}".format(*sys.version_info[:3]),
        "mimetype": "text/x-python",
        "file_extension": ".py",
        "codemirror_mode": {"name": "ipython", "version": 3},
        "pygments_lexer": "ipython3",
        "nbconvert_exporter": "python",
    },
}
"""A stripped kernel_info_reply: the workspace's one kernel, the Python the server runs (the kernel's), as the
server knows it; nothing of the kernel's reply."""


def strip_protocol(msg_type: str, content: dict[str, Any]) -> dict[str, Any]:
    """The protocol's own fields of a message, with none of the kernel's values but a status or an execution
    state from a fixed few: a reply keeps its status and no execution count."""
    if msg_type == "status":
        state = content.get("execution_state")
        return {"execution_state": state if state in ("busy", "idle", "starting") else "idle"}
    if msg_type == "clear_output":
        return {"wait": bool(content.get("wait", False))}
    if msg_type == "kernel_info_reply":
        return dict(KERNEL_INFO)
    out: dict[str, Any] = {"status": content.get("status") if content.get("status") in ("ok", "abort") else "error"}
    if out["status"] == "error":
        out.update(ename="OutputCapped", evalue="reply withheld by the output cap", traceback=[])
    return out


def replacement(verdict: Verdict, msg_type: str, content: dict[str, Any], cap: OutputCap) -> tuple[str, dict[str, Any]]:
    """What the browser receives instead of ``(msg_type, content)`` under ``verdict``.

    Metadata and binary buffers of a replaced message are always dropped by the caller.
    """
    if verdict is Verdict.STRIP:
        return msg_type, strip_protocol(msg_type, content)
    if verdict is Verdict.NOTICE:
        text = notice_text("this execution's output", cap.execution_bytes)
        return "stream", {"name": "stderr", "text": "\n" + text + "\n"}
    # Verdict.CUT: over the per-message cap.
    text = notice_text("one output message", cap.message_bytes)
    if msg_type == "stream" and isinstance(content.get("text"), str):
        head = content["text"].encode("utf-8")[: cap.message_bytes // 2].decode("utf-8", "ignore")
        return "stream", {"name": content.get("name", "stdout"), "text": head + "\n" + text + "\n"}
    if msg_type in ("display_data", "execute_result", "update_display_data"):
        new: dict[str, Any] = {"data": {"text/plain": text}, "metadata": {}}
        if msg_type == "execute_result" and isinstance(content.get("execution_count"), int):
            new["execution_count"] = content["execution_count"]
        transient = content.get("transient")
        if isinstance(transient, dict) and isinstance(transient.get("display_id"), str):
            new["transient"] = {"display_id": transient["display_id"][:128]}
        return msg_type, new
    if msg_type == "error":
        return "error", {"ename": "OutputCapped", "evalue": text, "traceback": [text]}
    if is_protocol(msg_type):
        stripped = strip_protocol(msg_type, content)
        if msg_type.endswith("_reply"):
            stripped.update(status="error", ename="OutputCapped", evalue=text, traceback=[text])
        return msg_type, stripped
    return "stream", {"name": "stderr", "text": "\n" + text + "\n"}
