"""Run one cell over a kernel websocket, as JupyterLab does, and collect what comes back.

Shared by the server-level harness (tests/server/harness.py, token auth) and the workspace harness
(tests/e2e/workspace.py, hub cookies). Speaks the legacy JSON protocol or, with ``v1``, the binary
protocol JupyterLab uses.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

V1 = "v1.kernel.websocket.jupyter.org"


@dataclass
class CellResult:
    stdout: str = ""
    stderr: str = ""
    result: str | None = None
    error: str | None = None
    outputs: list[dict] = field(default_factory=list)
    wire_bytes: int = 0
    """Bytes of every websocket frame this execution received (what left the server)."""
    prompts: list[str] = field(default_factory=list)
    """The prompts of input_request messages that reached the client."""
    reply: dict | None = None
    """The content of the execute_reply (None when the kernel went idle and none came within REPLY_GRACE)."""
    buffers: list[bytes] = field(default_factory=list)
    """The binary buffers of the iopub messages that reached the client (comm messages, display data)."""
    frames: list[bytes] = field(default_factory=list)
    """Every websocket frame this execution received, as it came (str frames encoded)."""
    parents: list[dict] = field(default_factory=list)
    """The parent header of each of this execution's messages that reached the client."""


REPLY_GRACE = 10.0
"""Seconds to wait, once the kernel is idle, for an execute_reply still on its way."""


def execute_request(
    code: str,
    username: str,
    *,
    session: str | None = None,
    msg_id: str | None = None,
    allow_stdin: bool = False,
    user_expressions: dict[str, str] | None = None,
) -> dict:
    """An execute_request as JupyterLab sends it (header, parent header, metadata and content; the caller
    adds ``channel`` and ``buffers`` for the legacy protocol), under a new msg_id and session unless given."""
    return {
        "header": {
            "msg_id": msg_id or uuid.uuid4().hex,
            "msg_type": "execute_request",
            "username": username,
            "session": session or uuid.uuid4().hex,
            "date": "",
            "version": "5.3",
        },
        "parent_header": {},
        "metadata": {},
        "content": {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": user_expressions or {},
            "allow_stdin": allow_stdin,
            "stop_on_error": True,
        },
    }


async def execute(
    url: str,
    headers: dict[str, str],
    username: str,
    code: str,
    timeout: float,
    *,
    v1: bool = False,
    channel: str = "shell",
    stdin_reply: str | None = None,
    user_expressions: dict[str, str] | None = None,
    msg_id: str | None = None,
) -> CellResult:
    """Send ``code`` as an execute_request on ``channel`` and read until the kernel is idle again.

    With ``stdin_reply``, the request allows stdin and each ``input()`` prompt is answered with it (the
    legacy protocol only); ``user_expressions`` go with the request (IPython evaluates them after the code);
    ``msg_id``: the request's, as a browser chose it (a new one otherwise)."""
    from jupyter_server.services.kernels.connection.base import (
        deserialize_binary_message,
        deserialize_msg_from_ws_v1,
        serialize_msg_to_ws_v1,
    )
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    ws = await websocket_connect(
        HTTPRequest(url, headers=headers), max_message_size=1 << 30, subprotocols=[V1] if v1 else None
    )
    request = execute_request(
        code, username, allow_stdin=stdin_reply is not None, user_expressions=user_expressions, msg_id=msg_id
    )
    msg_id = request["header"]["msg_id"]
    if v1:
        assert ws.selected_subprotocol == V1, ws.selected_subprotocol
        ws.write_message(serialize_msg_to_ws_v1(request, channel, lambda obj: json.dumps(obj).encode()), binary=True)
    else:
        ws.write_message(json.dumps({**request, "channel": channel, "buffers": []}))
    out = CellResult()
    deadline = time.monotonic() + timeout
    idle = False
    try:
        while time.monotonic() < deadline:
            raw = await asyncio.wait_for(ws.read_message(), timeout=max(0.1, deadline - time.monotonic()))
            if raw is None:
                raise RuntimeError("kernel websocket closed")
            out.wire_bytes += len(raw)
            out.frames.append(raw if isinstance(raw, bytes) else raw.encode())
            if v1:
                ch, parts = deserialize_msg_from_ws_v1(raw)
                msg = {
                    "channel": ch,
                    "header": json.loads(parts[0]),
                    "parent_header": json.loads(parts[1]),
                    "content": json.loads(parts[3]),
                    "buffers": parts[4:],
                }
                msg["msg_type"] = msg["header"]["msg_type"]
            elif isinstance(raw, bytes):
                # the legacy protocol's form of a message with binary buffers
                msg = deserialize_binary_message(raw)
                msg["msg_type"] = msg["header"]["msg_type"]
            else:
                msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            out.parents.append(msg["parent_header"])
            kind, content = msg["msg_type"], msg["content"]
            if kind == "input_request" and stdin_reply is not None:
                out.prompts.append(content.get("prompt", ""))
                reply = {
                    "header": {**request["header"], "msg_id": uuid.uuid4().hex, "msg_type": "input_reply"},
                    "parent_header": msg["header"],
                    "metadata": {},
                    "content": {"value": stdin_reply},
                    "channel": "stdin",
                    "buffers": [],
                }
                ws.write_message(json.dumps(reply))
                continue
            if msg.get("channel") == "iopub":
                out.outputs.append({"msg_type": kind, "content": content})
                out.buffers += [bytes(b) for b in msg.get("buffers") or []]
            if kind == "stream":
                if content["name"] == "stdout":
                    out.stdout += content["text"]
                else:
                    out.stderr += content["text"]
            elif kind == "execute_reply":
                out.reply = content
                if idle:
                    return out
            elif kind == "execute_result":
                out.result = content["data"].get("text/plain")
            elif kind == "error":
                out.error = f"{content['ename']}: {content['evalue']}"
            elif kind == "status" and content["execution_state"] == "idle":
                # iopub and shell are separate streams: the reply may come after the idle status. Wait a
                # short while for it; a kernel that died mid-cell sends none.
                if out.reply is not None:
                    return out
                idle = True
                deadline = min(deadline, time.monotonic() + REPLY_GRACE)
        if idle:
            return out
    except TimeoutError:
        if idle:
            return out
        raise
    finally:
        ws.close()
    raise TimeoutError(f"cell did not finish in {timeout}s: {code[:80]!r}")
