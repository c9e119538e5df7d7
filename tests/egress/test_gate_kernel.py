"""Kernels that write their own messages, against the egress gate in a real user's server with real sandboxed
kernels: what they send is read as the browser will read it, and counted against the execution that is running.

The world (a user, their server, the egress service in this process whose matcher reads ``row:<n>`` marks) is
the one of tests/egress/test_gate_server.py.
"""

from __future__ import annotations

import pytest

from tests.egress.test_gate_server import world  # noqa: F401 (the module's fixture)

ESCAPED_CELL = r"""
k = get_ipython().kernel
rows = '\n'.join(f'row:{{i}},{{i * 1.5}}' for i in range({first}, {first} + 60))
escaped = ''.join('\\u%04x' % ord(c) for c in rows)
k.session.send(k.iopub_socket, 'stream', content=('{{"name": "stdout", "text": "' + escaped + '"}}').encode(),
               parent=k.get_parent())
print('done')
"""


@pytest.mark.parametrize("v1", [False, True], ids=["json", "v1"])
def test_a_message_the_kernel_packed_with_every_character_escaped_is_read_as_the_browser_reads_it(world, v1):  # noqa: F811
    # The kernel writes its message's JSON itself, every character as \u00XX: the browser's JSON parser gives
    # the plain rows. The server packs what it forwards anew, so the gate reads the rows the browser would get.
    _, server, _, _, _ = world
    first = 7000 if v1 else 7100
    res = server.run(ESCAPED_CELL.format(first=first), v1=v1)
    # withheld, and the rest of the cell's output with it
    assert res.error is None and "done" not in res.stdout
    assert "row:" not in res.stdout and "60 rows of bc" in res.stderr, (res.stdout[:300], res.stderr[:300])


LATE_CELL = r"""
k = get_ipython().kernel
for i, parent in enumerate(P):
    rows = '\n'.join(f'row:{{j}},1.5' for j in range({first} + 15 * i, {first} + 15 * (i + 1)))
    k.session.send(k.iopub_socket, 'stream', {{'name': 'stdout', 'text': rows + '\n'}}, parent=parent)
"""


@pytest.mark.parametrize("v1", [False, True], ids=["json", "v1"])
def test_output_sent_as_that_of_executions_that_ended_counts_against_the_running_one(world, v1):  # noqa: F811
    # Each earlier cell's output ended at its reply; a later cell sends 15 rows as the output of each of three
    # of them (their parents kept by the kernel). Before, each started from zero rows and all 45 reached the
    # browser with no notice; they count against the cell that sends them.
    _, server, _, _, _ = world
    first = 7200 if v1 else 7300
    kernel = server.start_kernel()
    server.run("P = []", kernel, v1=v1)
    for _ in range(3):
        assert server.run("P.append(get_ipython().kernel.get_parent())", kernel, v1=v1).error is None
    res = server.run(LATE_CELL.format(first=first), kernel, v1=v1)
    wire = b"".join(res.frames)
    shown = [i for i in range(first, first + 45) if f"row:{i},".encode() in wire]
    assert len(shown) <= 20 and b"output withheld" in wire, (len(shown), res.stderr[:300])


ROWS_CELL = r"""
import time
open("ran-{mark}", "w").close()
for k in range({first}, {first} + 600, 100):
    print('\n'.join(f'row:{{i}},{{i * 1.5}}' for i in range(k, k + 100)), flush=True)
    time.sleep(0.03)
"""


@pytest.mark.parametrize("v1", [False, True], ids=["json", "v1"])
def test_a_request_with_a_msg_id_too_long_to_check_its_outputs_by_is_not_run(world, v1):  # noqa: F811
    """Attack (the browser): an execute_request whose msg_id has 70,000 characters. Each of its outputs' questions
    to the egress service named it and was too large to put; the gate took that for the service being away, and
    pieces under fail_closed_bytes passed on the unchecked allowance, which any other answered check renewed: 5,000
    of 5,000 rows reached the browser, none counted or recorded. The server now drops such a message, logging why
    (and a question the gate cannot put withholds its piece: tests/egress/test_service.py)."""
    _, server, _, _, _ = world
    first, mark = (7400, "v1") if v1 else (7500, "json")
    kernel = server.start_kernel()
    with pytest.raises(TimeoutError):
        server.run(ROWS_CELL.format(first=first, mark=mark), kernel, v1=v1, msg_id="m" * 70_000, timeout=8)
    assert "its msg_id has 70000 characters (at most 256)" in server.logs()
    res = server.run(f"import os; print(os.path.exists('ran-{mark}'))", kernel, v1=v1)
    assert res.error is None and res.stdout.strip() == "False", res


STATUS_CELL = r"""
k = get_ipython().kernel
import time
# the bytes of a table, one per status: the parent names one of the requests the browser sent, the state too
for n, b in enumerate(b'row:8000,12000.0\nrow:8001,12001.5\n'):
    for state in ('busy', 'idle', 'starting'):
        k.session.send(k.iopub_socket, 'status', {'execution_state': state}, parent={'msg_id': 'p%03d' % (b % 16)})
    if n % 8 == 7:
        time.sleep(0.05)
print('sent')
"""


async def _statuses_after_planting(server, kernel_id: str, v1: bool) -> tuple[list[tuple[str, str]], str]:
    """The browser sends 16 requests of a type the kernel does not know (p000 to p015), then the cell; what
    statuses reach it (parent, state) until the cell's idle, and the cell's stdout."""
    import asyncio
    import json
    import uuid

    from jupyter_server.services.kernels.connection.base import deserialize_msg_from_ws_v1, serialize_msg_to_ws_v1
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    from tests.kernelclient import V1, execute_request

    ws = await websocket_connect(
        HTTPRequest(
            f"ws://127.0.0.1:{server.port}/api/kernels/{kernel_id}/channels",
            headers={"Authorization": f"token {server.token}"},
        ),
        subprotocols=[V1] if v1 else None,
    )

    def send(msg):
        if v1:
            ws.write_message(serialize_msg_to_ws_v1(msg, "shell", lambda o: json.dumps(o).encode()), binary=True)
        else:
            ws.write_message(json.dumps({**msg, "channel": "shell", "buffers": []}))

    session = uuid.uuid4().hex
    for i in range(16):
        header = {"msg_id": f"p{i:03d}", "msg_type": "rt_request", "username": "u", "session": session}
        send({"header": {**header, "date": "", "version": "5.3"}, "parent_header": {}, "metadata": {}, "content": {}})
    request = execute_request(STATUS_CELL, server.user.pw_name, session=session)
    send(request)
    statuses: list[tuple[str, str]] = []
    stdout = ""
    try:
        while True:
            raw = await asyncio.wait_for(ws.read_message(), timeout=60)
            assert raw is not None, "the websocket closed"
            if v1:
                _, parts = deserialize_msg_from_ws_v1(raw)
                header, parent, content = json.loads(parts[0]), json.loads(parts[1]), json.loads(parts[3])
            else:
                msg = json.loads(raw)
                header, parent, content = msg["header"], msg["parent_header"], msg["content"]
            if header["msg_type"] == "stream":
                stdout += content["text"]
            if header["msg_type"] == "status":
                statuses.append((parent.get("msg_id", ""), content["execution_state"]))
                if statuses[-1] == (request["header"]["msg_id"], "idle"):
                    return statuses, stdout
    finally:
        ws.close()


@pytest.mark.parametrize("v1", [False, True], ids=["json", "v1"])
def test_a_kernels_status_messages_carry_no_parent_or_state_of_its_choosing(world, v1):  # noqa: F811
    """Attack (kernel and browser together): the browser sends 16 requests the kernel never answers; a cell then
    sends a table one byte per status message, the byte in the parent it names (one of the 16) and the state it
    picks. Statuses were never checked or counted, and went on with any kept request as parent: a 1,000-row
    table reached the browser at about 1 KB/s. Now the statuses that go on are one busy and one idle per request,
    in the order the requests were sent: none of the cell's 102 chosen ones."""
    import asyncio

    _, server, _, _, _ = world
    kernel = server.start_kernel()
    statuses, stdout = asyncio.run(_statuses_after_planting(server, kernel, v1))
    assert "sent" in stdout
    planted = [p for p, _ in statuses if p.startswith("p0")]
    # the kernel's own busy and idle for each request it took in turn (ipykernel answers an unknown type with
    # both), and nothing of the cell's: no request named twice as busy or idle, none out of its turn
    assert planted == sorted(planted) and len(planted) <= 32, statuses
    for state in ("busy", "idle"):
        named = [p for p, s in statuses if s == state and p.startswith("p0")]
        assert len(named) == len(set(named)), statuses
    assert not [s for p, s in statuses if s == "starting"], statuses
    cell = [s for p, s in statuses if not p.startswith("p0")]
    assert cell == ["busy", "idle"], statuses
