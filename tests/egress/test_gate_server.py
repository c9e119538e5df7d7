"""The egress gate in a real user's server with real sandboxed kernels: kernel output, contents and other
responses all pass it, and what it withholds never reaches the client.

The egress service runs in this process on the site's real gate socket; its matcher reads row ids from the
text (``row:<n>`` marks row n of ``onc/bc``) so the plumbing is tested apart from row detection
(tests/e2e/test_egress.py attacks the whole workspace with real data and the real matcher).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import io
import json
import os
import pickle
import re
import time
import zlib
from pathlib import Path

import nbformat
import pytest

from paitient.registry import Registry
from paitient.rules.edm.tokens import as_read, normalised
from paitient.services.egress import socket_path
from paitient.services.egress.service import EgressServer, EgressService
from paitient.services.egress.store import EgressStore, today
from tests import accounts, workspacegroup
from tests.egress.conftest import stored
from tests.egress.test_service import MarkedRows
from tests.kernelclient import execute_request
from tests.server.harness import UserServer, make_site, publish


class ReadAsShown(MarkedRows):
    """Row marks read in the text as the egress service's row detection reads it (:func:`as_read`, then
    :func:`normalised`): the digits of every script are ASCII, so ``row:７００`` in full-width digits marks
    row 700 as ``row:700`` does, and JupyterLab's view of the JSON is read too."""

    def reveal(self, text: bytes, projects):
        return super().reveal(normalised(as_read(text)), projects)


ROWS_CELL = "print('\\n'.join(f'row:{{i}},{{i * 1.5}}' for i in range({first}, {last})))"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import pwd
    import shutil
    import subprocess
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="ptg-", dir="/tmp"))
    os.chmod(root, 0o755)
    # one account and server for the whole module; each cell runs in a kernel of its own, shut down after it
    site = make_site(root, {"onc": ["bc"]})
    publish(site, "onc", "bc", "a,b\n1,2\n")
    name = f"ptg{os.getpid() % 100000}"
    subprocess.run(
        [
            "useradd",
            "--system",
            "--no-user-group",
            "--gid",
            "nogroup",
            "--groups",
            str(workspacegroup.gid()),  # a member: it may reach the services' sockets
            "--home-dir",
            str(root / name),
            "--create-home",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ],
        check=True,
        capture_output=True,
    )
    user = pwd.getpwnam(name)
    os.chmod(user.pw_dir, 0o700)
    store = EgressStore.for_site(site)
    service = EgressService(site, store, ReadAsShown(site), Registry.for_state_dir(site.state_dir))
    egress = EgressServer(socket_path(site), service, group=workspacegroup.gid())
    egress.start_in_thread()
    server = UserServer(site, user, ("onc",), root, start_egress=False)
    Registry.for_state_dir(site.state_dir).put(server.member)
    try:
        with server:
            yield site, server, service, Path(user.pw_dir), user
    finally:
        egress.shutdown()
        egress.server_close()
        service.close()
        store.close()
        shutil.rmtree(root, ignore_errors=True)
        accounts.remove_all([name])


def _put(home: Path, user, name: str, data: bytes) -> None:
    (home / name).write_bytes(data)
    os.chown(home / name, user.pw_uid, user.pw_gid)


def test_an_output_with_few_rows_reaches_the_browser(world):
    _, server, _, _, _ = world
    res = server.run(ROWS_CELL.format(first=0, last=5))
    assert res.stdout.count("row:") == 5 and res.error is None


def test_an_output_with_too_many_rows_is_withheld_with_a_notice(world):
    _, server, _, _, _ = world
    res = server.run(ROWS_CELL.format(first=100, last=160))
    assert "row:" not in res.stdout
    assert "output withheld" in res.stderr and "60 rows of bc" in res.stderr and "airlock" in res.stderr


def test_a_loop_of_small_prints_in_one_cell_is_one_output(world):
    _, server, _, _, _ = world
    code = "import time\nfor i in range(200, 240):\n    print(f'row:{i},1.0', flush=True); time.sleep(0.02)"
    res = server.run(code)
    assert 0 < res.stdout.count("row:") <= 20, res.stdout
    assert "output withheld" in res.stderr


def test_rows_in_an_execute_result_and_a_display_are_checked_too(world):
    _, server, _, _, _ = world
    res = server.run("'\\n'.join(f'row:{i}' for i in range(300, 340))")
    assert res.result is None and "output withheld" in res.stderr
    res = server.run(
        "from IPython.display import HTML, display\n"
        "display(HTML('<table>' + ''.join(f'<tr><td>row:{i}</td></tr>' for i in range(400, 440)) + '</table>'))"
    )
    assert not any("row:4" in json.dumps(o) for o in res.outputs if o["msg_type"] == "display_data")
    assert "output withheld" in res.stderr


def test_rows_in_an_input_prompt_are_withheld(world):
    _, server, _, _, _ = world
    res = server.run(
        "answer = input('\\n'.join(f'row:{i}' for i in range(500, 540)))\nprint('got', answer)", stdin_reply="yes"
    )
    assert len(res.prompts) == 1 and "row:5" not in res.prompts[0], res.prompts
    # the kernel got its answer and finished; the rest of an execution that showed too many rows stays out too
    assert "output withheld" in res.prompts[0] and res.error is None and "output withheld" in res.stderr


def test_rows_on_stderr_are_withheld(world):
    _, server, _, _, _ = world
    res = server.run("import sys\nsys.stderr.write('\\n'.join(f'row:{i}' for i in range(550, 590)))")
    assert "row:5" not in res.stderr and "output withheld" in res.stderr


# Rows a cell prints so that no message of it shows one, and JupyterLab, which goes on with each message of a
# stream where the last one left its cursor, shows each row whole: written over letters after a carriage
# return, a letter taken back with a backspace, or a row printed in two halves.
ACROSS_MESSAGES = {
    "carriage return": "print(f'Zow:{i},1.5', end='', flush=True); time.sleep(0.003); print('\\rr', flush=True)",
    "backspace": "print('rowx', end='', flush=True); time.sleep(0.003); print(f'\\b:{i},1.5', flush=True)",
    "halves": "print('ro', end='', flush=True); time.sleep(0.003); print(f'w:{i},1.5', flush=True)",
    # (a third red team's) a letter between the halves that an Output widget captures: JupyterLab shows it in
    # the widget, never displayed here, and the cell shows each row whole
    "a widget's letter between": "print('ro', end='', flush=True)\n    with o: print('x', end='', flush=True)\n"
    "    print(f'w:{i},1.5', flush=True)",
}
# (a fourth's) a message withheld, and so dropped, between a row's letter and the backspace that takes it
# back: JupyterLab never sees it and goes on with its cursor after the letter
ACROSS_MESSAGES["a dropped message between"] = (
    "print('rowZ', end='', flush=True); time.sleep(0.003); print('\\u202e', end='', flush=True)\n"
    "    time.sleep(0.003); print(f'\\b:{i},1.5', flush=True)"
)
# two widgets capture the cell; the first's capture, sent again unchanged, moves nothing in JupyterLab
ACROSS_MESSAGES["a capture sent again"] = (
    "with a:\n        with b:\n            print('rowZ', end='', flush=True); a.send_state('msg_id')\n"
    "            print(f'\\b:{i},1.5', flush=True)"
)
PRELUDE = {
    "a widget's letter between": "import ipywidgets\no = ipywidgets.Output()\n",
    "a dropped message between": "print('\\u202e')\n",
    "a capture sent again": "import ipywidgets\na, b = ipywidgets.Output(), ipywidgets.Output()\n",
}


@pytest.mark.parametrize("how", list(ACROSS_MESSAGES))
def test_rows_that_only_messages_together_show_are_read_as_jupyterlab_shows_them(world, how):
    """Attack: 60 rows, each printed over two messages of stdout that show no row on their own. The server
    follows the cell's stream from message to message as JupyterLab does, and the row detection reads what
    each message makes it show: the output is withheld after the rows one output may show, and what
    JupyterLab would show of what reached the client holds no more than those (before: all 60)."""
    from paitient.rules.edm.tokens import as_lab_shows

    _, server, _, _, _ = world
    first = 7000 + 100 * list(ACROSS_MESSAGES).index(how)
    code = PRELUDE.get(how, "") + f"import time\nfor i in range({first}, {first + 60}):\n    " + ACROSS_MESSAGES[how]
    res = server.run(code)
    # (without the letters the widget captured, which reach this client as stdout too)
    cell = cell_stdout(res).replace("x", "") if how == "a widget's letter between" else cell_stdout(res)
    shown = as_lab_shows(cell.encode())
    rows = {int(m) for m in re.findall(rb"row:(\d+)", shown)}
    assert 0 < len(rows) <= 20, (len(rows), shown[:300])
    assert "output withheld" in res.stderr


def cell_stdout(res) -> str:
    """What a cell's area shows of the stdout that reached the client: another output (the gate's notice on
    stderr, a display) ends one stdout output, and the next starts another, on a line of its own."""
    parts = []
    for out in res.outputs:
        content = out.get("content") or {}
        if out["msg_type"] == "stream" and content.get("name") == "stdout":
            parts.append(content["text"])
        elif out["msg_type"] in ("stream", "display_data", "execute_result", "error"):
            parts.append("\n")
    return "".join(parts)


def rows_shown_in_widgets(outputs: list[dict], row: str) -> int:
    """Lines matching ``row`` that JupyterLab shows in the Output widgets of a cell, from the iopub messages
    that reached the client: a widget exists once its comm_open came, its area shows the stream text its
    ``outputs`` state gave it, and a stream message goes on from that text while the widget captures the
    cell (its ``msg_id``); a message no widget the browser has captures shows in the cell instead."""
    from paitient.rules.edm.tokens import as_lab_shows

    shown: dict[str, str] = {}
    capturing: str | None = None
    count = 0
    for out in outputs:
        kind, content = out["msg_type"], out["content"]
        comm = content.get("comm_id")
        if kind == "comm_open":
            shown[comm] = ""
        elif kind == "comm_msg" and comm in shown:
            state = (content.get("data") or {}).get("state") or {}
            if "outputs" in state:
                shown[comm] = "".join(o.get("text", "") for o in state["outputs"] if o.get("output_type") == "stream")
            if "msg_id" in state:
                capturing = comm if state["msg_id"] else None
        elif kind == "stream" and capturing in shown:
            before = len(re.findall(row, as_lab_shows(shown[capturing].encode()).decode()))
            shown[capturing] += content["text"]
            count += len(re.findall(row, as_lab_shows(shown[capturing].encode()).decode())) - before
    return count


def test_a_row_ended_in_an_output_widget_whose_outputs_the_kernel_set_is_read_whole(world):
    """Attack (a fourth red team's): a widget whose ``outputs`` the kernel sets to a stream ending in a
    letter, then a captured backspace that takes it back: JupyterLab shows each row whole in the widget.
    The server follows the widget's area from the outputs it set, and withholds after the rows allowed."""
    _, server, _, _, _ = world
    code = (
        "import ipywidgets\nfor i in range(7900, 7960):\n    w = ipywidgets.Output()\n"
        "    w.outputs = ({'output_type': 'stream', 'name': 'stdout', 'text': 'rowZ'},)\n"
        "    with w: print(f'\\b:{i},1.5', flush=True)"
    )
    res = server.run(code)
    assert "output withheld" in res.stderr, res.stderr[-300:]
    # Counted as the browser shows them: once the rows allowed are spent, a widget's messages may pass in part
    # (its comm_open withheld, or its "rowZ"), and a print into it then shows no row (":7950,1.5"), in the
    # widget or in the cell: the browser's own view of the widgets is rebuilt from what reached it.
    assert 0 < rows_shown_in_widgets(res.outputs, r"row:79\d\d,1\.5") <= 20


def test_a_message_the_iopub_rate_limit_drops_is_not_read_into_the_line_the_browser_shows(world):
    """Attack: each row printed as ``row``, a letter and the rest, with a burst of messages (under no cell's
    header, so the rate limit's notice shows in no cell) that makes jupyter_server's IOPub rate limit drop
    the letter. The stock connection applied the limit after the gate: the gate read the letter into the
    line (``rowZ:7800``, no row) and the browser never got it (``row:7800``): all 25 rows shown. The limit
    now applies before the gate, so the gate reads the line the browser shows, and withholds after 20."""
    from paitient.rules.edm.tokens import as_lab_shows

    site, _, _, home, user = world
    limits = (
        "--ZMQChannelsWebsocketConnection.iopub_msg_rate_limit=40",
        "--ZMQChannelsWebsocketConnection.rate_limit_window=0.5",
    )
    code = (
        "import time\nk = get_ipython().kernel\nfor i in range(7800, 7825):\n"
        "    print('row', end='', flush=True)\n"
        "    for _ in range(30):\n"
        "        k.session.send(k.iopub_socket, 'comm_msg', {'comm_id': 'burst', 'data': {}}, parent={})\n"
        "    print('Z', end='', flush=True)\n"
        "    time.sleep(0.6)\n"
        "    print(f':{i},1.5', flush=True)\n"
    )
    # and a burst under the cell's own header, which the kernel wrote a field into
    burst = (
        "k = get_ipython().kernel\nparent = {'header': {**k.get_parent()['header'], 'note': 'row:7700'}}\n"
        "for _ in range(30):\n"
        "    k.session.send(k.iopub_socket, 'comm_msg', {'comm_id': 'b', 'data': {}}, parent=parent)\n"
        "print('after', flush=True)"
    )
    with UserServer(site, user, ("onc",), home.parent, start_egress=False, extra_args=limits) as server:
        res = server.run(code)
        own = server.run(burst)
    # the rate limit's notice: in the cell, in its place, under the client's header (not the kernel's)
    assert "IOPub message rate exceeded" in own.stderr and "after" not in own.stdout, own.outputs[-3:]
    assert own.parents and all("note" not in p for p in own.parents), own.parents[:2]
    assert res.stdout.count("Z") < 25, "the rate limit dropped none of the letters: the attack did not run"
    cell = cell_stdout(res)
    rows = set(re.findall(rb"row:(\d+)", as_lab_shows(cell.encode())))
    assert 0 < len(rows) <= 20, (len(rows), cell[-300:])
    assert "output withheld" in res.stderr, res.stderr[-300:]


async def _reconnecting_run(
    server, kernel_id: str, code: str, again_after: str, *, resend: bool = False, timeout: float = 120
) -> list[dict]:
    """Run ``code`` as JupyterLab's "Reconnect to Kernel" would see it, pressed each time a stream message
    ends in ``again_after``: the kernel websocket closed and opened anew with the same session (the server
    keeps what the kernel sends meanwhile and replays it). With ``resend``, each new connection first sends
    a request under the running execution's msg_id. The execution's messages that reached the client, in
    order, until one shows ``END``."""
    import uuid

    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    session = uuid.uuid4().hex
    url = f"ws://127.0.0.1:{server.port}/api/kernels/{kernel_id}/channels?session_id={session}"
    headers = {"Authorization": f"token {server.token}"}
    request = execute_request(code, server.user.pw_name, session=session)
    msg_id = request["header"]["msg_id"]
    ws = await websocket_connect(HTTPRequest(url, headers=headers), max_message_size=1 << 30)
    ws.write_message(json.dumps({**request, "channel": "shell", "buffers": []}))
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = await asyncio.wait_for(ws.read_message(), timeout=max(0.1, deadline - time.monotonic()))
        assert raw is not None, "the kernel websocket closed"
        msg = json.loads(raw)
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        got.append(msg)
        text = msg["content"].get("text", "") if msg["msg_type"] == "stream" else ""
        if msg["msg_type"] == "execute_reply" or "END" in text:
            break
        if text.endswith(again_after):
            ws.close()
            ws = await websocket_connect(HTTPRequest(url, headers=headers), max_message_size=1 << 30)
            if resend:
                again = {"header": {**request["header"], "msg_type": "kernel_info_request"}, "content": {}}
                ws.write_message(json.dumps({**request, **again, "channel": "shell", "buffers": []}))
    ws.close()
    return got


@pytest.mark.parametrize("resend", [False, True], ids=["reconnect", "the running request's id sent again"])
def test_a_row_whose_halves_come_on_either_side_of_a_reconnect_is_not_shown_whole(world, resend):
    """Attack: each row printed in two halves, with JupyterLab's "Reconnect to Kernel" between them. The
    cell keeps its output, and went on with each row's first half; the server, which followed the cell's
    line on the connection that closed, read the second half on a line of its own: 25 of 25 rows reached
    the client, none read. A new connection now sends the first message of a line it did not follow after
    a line feed, so the browser shows the halves on lines of their own too, as the gate read them. A
    request under the running cell's msg_id, sent on the new connection, does not make its area new."""
    from paitient.rules.edm.tokens import as_lab_shows

    _, server, _, _, _ = world
    code = (
        "import time\nfor i in range(7400, 7425):\n"
        "    print('ro', end='', flush=True)\n    time.sleep(0.3)\n    print(f'w:{i},1.5', flush=True)\n"
        "print('END')\n"
    )
    kernel_id = server.start_kernel()
    try:
        got = asyncio.run(_reconnecting_run(server, kernel_id, code, again_after="ro", resend=resend))
    finally:
        server.request("DELETE", f"/api/kernels/{kernel_id}")
    streams = [m["content"] for m in got if m["msg_type"] == "stream"]
    assert sum(1 for c in streams if c["text"].endswith("ro")) > 20, "the client reconnected too seldom"
    cell = "".join(c["text"] if c["name"] == "stdout" else "\n" for c in streams)
    assert not re.findall(rb"row:(\d+)", as_lab_shows(cell.encode())), cell[-300:]
    # nothing lost: each second half came, on a line of its own
    assert sum(1 for c in streams if re.fullmatch(r"\nw:74\d\d,1\.5\n", c["text"])) > 20, streams[-4:]


def test_a_row_continued_in_an_area_the_server_let_go_of_is_not_shown_whole(world):
    """Attack: a widget shows ``ro``; then 1,100 more widgets, each printed into, make the server let go of
    the first one's line (it keeps 1,024); then the first widget gets ``w:7300,1.5`` and 20 whole rows.
    Before, JupyterLab showed 21 rows in it and the gate read 20 (the first as ``w:7300``), so all passed.
    Now the message to the let-go area starts a line of its own, and the widget shows 20 rows."""
    from paitient.rules.edm.tokens import as_lab_shows

    _, server, _, _, _ = world
    code = (
        "import ipywidgets, sys, time\n"
        "first = ipywidgets.Output()\nwith first:\n    print('ro', end='', flush=True)\n"
        "for n in range(1100):\n"
        "    other = ipywidgets.Output()\n"
        "    with other:\n        print(f'x{n}', end='', file=sys.stderr, flush=True)\n"
        "    if n % 100 == 99:\n        time.sleep(0.5)  # under jupyter_server's IOPub message rate\n"
        "with first:\n    print('w:7300,1.5')\n"
        "    print('\\n'.join(f'row:{i},1.5' for i in range(7301, 7321)), flush=True)\n"
    )
    res = server.run(code, timeout=180)
    assert "rate exceeded" not in res.stderr and "withheld" not in res.stderr, res.stderr[-300:]
    # on stdout, the cell prints only what the first widget captures
    assert res.stdout.startswith("ro") and "w:7300" in res.stdout, res.stdout[:100]
    rows = set(re.findall(rb"row:(\d+)", as_lab_shows(res.stdout.encode())))
    assert len(rows) == 20 and b"7300" not in rows, (len(rows), res.stdout[:60])


def test_a_progress_bar_that_overwrites_its_line_reaches_the_browser(world):
    """What a training loop prints (tqdm's carriage returns, one message each) passes as it did."""
    _, server, _, _, _ = world
    code = (
        "import time\nfor i in range(101):\n"
        "    print(f'\\repoch 3 {i:3d}% loss {1 / (i + 1):.4f}', end='', flush=True); time.sleep(0.002)\nprint()"
    )
    res = server.run(code)
    assert res.error is None and "output withheld" not in res.stderr
    assert res.stdout.count("\repoch 3") == 101 and res.stdout.endswith("100% loss 0.0099\n")


HEADER_CELL = """
k = get_ipython().kernel
rows = '\\n'.join(f'row:{{i}},{{i * 1.5}}' for i in range({first}, {first} + 100))
parent = dict(k.get_parent()['header'], stash=rows)
header = k.session.msg_header('stream')
header['stash'] = rows
k.session.send(k.iopub_socket, 'stream', {{'name': 'stdout', 'text': 'plain text\\n'}}, parent=parent, header=header)
k.session.send(k.iopub_socket, 'status', {{'execution_state': 'busy'}}, parent=parent)
odd = dict(header, msg_type='stream ' + rows)
k.session.send(k.iopub_socket, 'stream', {{'name': 'stdout', 'text': 'odd type\\n'}}, parent=parent, header=odd)
print('done')
"""


@pytest.mark.parametrize("v1", [False, True], ids=["json", "v1"])
def test_nothing_a_kernel_writes_into_a_message_header_or_its_parent_reaches_the_browser(world, v1):
    # The gate reads content, metadata and buffers; a header or parent header the kernel filled with rows
    # (even one of a status message, which bypasses the output cap) must not carry them past it.
    _, server, _, _, _ = world
    first = 5000 if v1 else 6000
    res = server.run(HEADER_CELL.format(first=first), v1=v1)
    wire = b"".join(res.frames)
    assert res.error is None and "plain text" in res.stdout and "done" in res.stdout
    assert [r for r in (f"row:{i},".encode() for i in range(first, first + 100)) if r in wire] == []
    assert b'"stash"' not in wire
    # the message of an invalid type is dropped; the others go on with the client's own request header
    assert "odd type" not in res.stdout
    assert res.parents and all(set(p) <= {"msg_id", "msg_type", "session", "username", "date", "version"}
                               for p in res.parents)  # fmt: skip
    assert {p["msg_type"] for p in res.parents} == {"execute_request"}


def test_a_data_file_renamed_to_source_is_not_served(world):
    _, server, _, home, user = world
    _put(
        home,
        user,
        "analysis.py",
        b"patient,radius,texture\n" + b"".join(b"P-%d,%d.5,%d.25\n" % (i, i, i) for i in range(50)),
    )
    _put(home, user, "model.txt", pickle.dumps({"x": [1.5, 2.5]}))
    for name, what in (("analysis.py", "delimited text"), ("model.txt", "a Python pickle")):
        r = server.get(f"/api/contents/{name}?content=1&type=file&format=text")
        assert r.status_code == 403, (name, r.status_code, r.text[:300])
        assert what in r.json()["message"] and "airlock" in r.json()["message"]


def test_a_text_file_with_too_many_rows_is_not_served(world):
    _, server, _, home, user = world
    _put(home, user, "rows.md", "\n".join(f"- row:{i} looks fine" for i in range(600, 650)).encode())
    r = server.get("/api/contents/rows.md?content=1")
    assert r.status_code == 403 and "50 rows of bc" in r.json()["message"]
    _put(home, user, "few.md", "\n".join(f"- row:{i}" for i in range(600, 603)).encode())
    r = server.get("/api/contents/few.md?content=1")
    assert r.status_code == 200 and r.json()["content"].count("row:") == 3


def test_a_notebook_written_by_the_kernel_has_its_row_outputs_replaced(world):
    import nbformat

    _, server, _, home, user = world
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "df.head()",
            outputs=[
                nbformat.v4.new_output("stream", name="stdout", text="".join(f"row:{i}\n" for i in range(700, 703)))
            ],
        ),
        nbformat.v4.new_code_cell(
            "print(df.to_csv())",
            outputs=[
                nbformat.v4.new_output("stream", name="stdout", text="".join(f"row:{i}\n" for i in range(710, 760)))
            ],
        ),
        nbformat.v4.new_markdown_cell("notes"),
    ]
    _put(home, user, "kernel-wrote.ipynb", nbformat.writes(nb).encode())
    r = server.get("/api/contents/kernel-wrote.ipynb?content=1")
    assert r.status_code == 200, r.text[:300]
    cells = r.json()["content"]["cells"]
    assert cells[0]["outputs"][0]["text"].count("row:") == 3
    assert "row:7" not in json.dumps(cells[1]) and "output withheld" in cells[1]["outputs"][0]["text"]
    assert cells[2]["source"] == "notes"


@pytest.mark.parametrize(
    "hide",
    [lambda i: f"rowx\b:{i}", lambda i: f"Zow:{i}\rr", lambda i: f"ro\x1b[ 0mw:{i}"],
    ids=["backspace", "carriage return", "escape JupyterLab drops"],
)
def test_rows_a_notebook_shows_only_through_its_control_characters_are_withheld(world, hide):
    """Attack (a red team's, with real rows): a notebook the kernel wrote, whose stream output spells each row
    with a control character that JupyterLab follows, so that its JSON shows no row and the notebook opened
    in JupyterLab shows each one whole. Read as JupyterLab shows it, the output is replaced."""
    import nbformat

    _, server, _, home, user = world
    text = "".join(hide(i) + "\n" for i in range(900, 950))
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("print(df)", outputs=[nbformat.v4.new_output("stream", text=text)])]
    _put(home, user, "controls.ipynb", nbformat.writes(nb).encode())
    r = server.get("/api/contents/controls.ipynb?content=1")
    assert r.status_code == 200, r.text[:300]
    output = r.json()["content"]["cells"][0]["outputs"][0]
    assert ":90" not in json.dumps(output) and "output withheld" in output["text"]


def test_rows_cut_at_the_ends_of_stream_outputs_are_read_as_jupyterlab_joins_them(world):
    """Attack (a second red team's): a notebook whose cell holds each row as two stream outputs, cut in the
    middle of its marker, which JupyterLab joins into one text as it loads the notebook. The server joins
    them too, and the one output is withheld."""
    import nbformat

    _, server, _, home, user = world
    halves = [nbformat.v4.new_output("stream", text=t) for i in range(960, 1010) for t in ("ro", f"w:{i}\n")]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("print(df)", outputs=halves)]
    _put(home, user, "halves.ipynb", nbformat.writes(nb).encode())
    r = server.get("/api/contents/halves.ipynb?content=1")
    assert r.status_code == 200, r.text[:300]
    (output,) = r.json()["content"]["cells"][0]["outputs"]
    assert "w:9" not in json.dumps(output) and "output withheld" in output["text"]


def test_rows_cut_at_the_ends_of_an_output_widgets_stream_outputs_are_withheld(world):
    """The same through an ipywidgets Output widget's state, which its view loads as a notebook's outputs."""
    _, server, _, _, _ = world
    code = (
        "import ipywidgets as w\nfrom IPython.display import display\no = w.Output()\n"
        "o.outputs = tuple({'output_type': 'stream', 'name': 'stdout', 'text': t}"
        " for i in range(1100, 1150) for t in ('ro', f'w:{i}\\n'))\ndisplay(o)"
    )
    res = server.run(code)
    wire = b"".join(res.frames)
    assert b"w:1100" not in wire and "output withheld" in res.stderr, res.stderr[-500:]


def test_an_output_with_bidirectional_controls_is_withheld_saying_why(world):
    """A browser may draw such text in another order than it holds it: the service does not read it and
    withholds it whatever its size, with a notice that says what to change; the next output passes."""
    _, server, _, _, _ = world
    res = server.run("print('\\u202e' + 'row:1200, 1.5'[::-1] + '\\u202c')")
    assert "row:" not in res.stdout and "1200" not in res.stdout
    assert "output withheld: it holds bidirectional controls" in res.stderr and "airlock" in res.stderr
    assert server.run("print('plain')").stdout == "plain\n"


def test_rows_in_attachments_and_metadata_do_not_pass(world):
    import nbformat

    _, server, _, home, user = world
    rows = "".join(f"row:{i}\n" for i in range(800, 850))
    nb = nbformat.v4.new_notebook(metadata={"stash": rows})
    cell = nbformat.v4.new_markdown_cell("![x](attachment:x.txt)")
    cell.attachments = {"x.txt": {"text/plain": rows}}
    nb.cells = [cell]
    _put(home, user, "stash.ipynb", nbformat.writes(nb).encode())
    r = server.get("/api/contents/stash.ipynb?content=1")
    assert r.status_code == 200
    assert "row:8" not in r.text


def test_file_names_in_a_listing_are_checked(world):
    _, server, _, home, user = world
    folder = home / "names"
    folder.mkdir()
    os.chown(folder, user.pw_uid, user.pw_gid)
    for i in range(900, 950):
        _put(folder, user, f"row:{i}", b"")
    r = server.get("/api/contents/names?content=1")
    assert r.status_code == 403 and "listing withheld" in r.json()["message"]


def test_a_key_the_kernel_adds_at_a_notebooks_top_level_stays_behind(world):
    # nbformat reads a notebook with keys of its own at the top level (it only logs the schema error); only
    # the checked metadata and cells, and the format version, go out
    _, server, _, _, _ = world
    res = server.run(
        "import json\n"
        "rows = ''.join(f'row:{i},1.5\\n' for i in range(960, 1060))\n"
        "doc = {'nbformat': 4, 'nbformat_minor': 10**40, 'metadata': {}, 'cells': [], 'stash': rows}\n"
        "json.dump(doc, open('extra.ipynb', 'w'))"
    )
    assert res.error is None
    r = server.get("/api/contents/extra.ipynb?content=1")
    assert r.status_code == 200, r.text[:300]
    assert "row:" not in r.text
    nb = r.json()["content"]
    assert set(nb) == {"nbformat", "nbformat_minor", "metadata", "cells"} and nb["nbformat"] == 4
    assert nb["nbformat_minor"] == nbformat.v4.nbformat_minor


def _kernel_writes(server, name: str, doc: str) -> None:
    """The kernel writes ``name``: the JSON of the Python expression ``doc``, in which ``rows`` is 100 rows."""
    first = FIRST[name]
    kernel = server.start_kernel()
    try:
        res = server.run(
            "import json\n"
            f"rows = ''.join(f'row:{{i}},{{i * 1.5}}\\n' for i in range({first}, {first + 100}))\n"
            f"json.dump({doc}, open({name!r}, 'w'))",
            kernel,
        )
    finally:
        server.request("DELETE", f"/api/kernels/{kernel}")
    assert res.error is None, res


FIRST = {"ks.ipynb": 1400, "dict-source.ipynb": 1500, "list-source.ipynb": 1600, "extra-key.ipynb": 1700}


def test_a_withheld_notebooks_kernelspec_is_the_servers_own_not_the_files(world):
    # the metadata was withheld (rows in one key), and its kernelspec, unchecked, went out as the file had it
    _, server, _, _, _ = world
    _kernel_writes(
        server,
        "ks.ipynb",
        "{'nbformat': 4, 'nbformat_minor': 5, 'cells': [], 'metadata': {"
        "'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python', 'rows': rows},"
        "'stash': rows[:400]}}",
    )
    r = server.get("/api/contents/ks.ipynb?content=1")
    assert r.status_code == 200, r.text[:300]
    assert "row:" not in r.text
    metadata = r.json()["content"]["metadata"]
    assert set(metadata) <= {"kernelspec"}, metadata
    if metadata:  # a kernel this server has, described by the server's spec
        assert set(metadata["kernelspec"]) == {"name", "display_name", "language"}, metadata


def test_a_cell_whose_source_is_not_text_is_replaced_not_sent(world):
    # a source that is a dict was checked by its keys only ("".join(dict)), and the cell went out whole
    _, server, _, _, _ = world
    for name, source in (("dict-source.ipynb", "{'x': rows}"), ("list-source.ipynb", "['notes', {'x': rows}]")):
        _kernel_writes(
            server,
            name,
            "{'nbformat': 4, 'nbformat_minor': 5, 'metadata': {}, 'cells': ["
            f"{{'cell_type': 'markdown', 'metadata': {{}}, 'id': 'a1', 'source': {source}}},"
            "{'cell_type': 'markdown', 'metadata': {}, 'id': 'a2', 'source': 'notes'}]}",
        )
    r = server.get("/api/contents/dict-source.ipynb?content=1")
    assert r.status_code == 200, r.text[:300]
    assert "row:" not in r.text
    cells = r.json()["content"]["cells"]
    assert cells[0]["source"] == "This cell is not in the notebook format and is not shown.", cells[0]
    assert cells[1]["source"] == "notes"
    assert "1 part of this notebook that do not follow the notebook format" in r.json()["message"]
    # a list with a dict in it is a notebook nbformat does not read at all: refused, not quoted
    r = server.get("/api/contents/list-source.ipynb?content=1")
    assert r.status_code == 400 and "Unreadable Notebook: list-source.ipynb" in r.json()["message"]
    assert "row:" not in r.text


def test_a_cell_is_sent_rebuilt_from_the_formats_own_fields(world):
    # a withheld cell kept every key but its source, attachments and metadata: rows in a key of the kernel's
    # own went out beside the notice. A cell is now a new one, of the format's fields only (a key of the
    # kernel's own stays behind, withheld or not); a withheld one is the notice and nothing of the file's; an
    # output with a key of its own is replaced; a repeated cell id is replaced (the notebook still opens)
    _, server, _, _, _ = world
    _kernel_writes(
        server,
        "extra-key.ipynb",
        "{'nbformat': 4, 'nbformat_minor': 5, 'metadata': {}, 'cells': ["
        "{'cell_type': 'code', 'metadata': {'stash': rows[:400]}, 'id': 'a1', 'source': '1+1', 'outputs': [],"
        " 'execution_count': 1, 'extra': rows},"
        "{'cell_type': 'code', 'metadata': {}, 'id': 'a2', 'source': '2+2', 'execution_count': 2, 'extra': rows,"
        " 'outputs': [{'output_type': 'stream', 'name': 'stdout', 'text': '4', 'extra': rows}]},"
        "{'cell_type': 'markdown', 'metadata': {}, 'id': 'a2', 'source': 'notes', 'extra': rows}]}",
    )
    r = server.get("/api/contents/extra-key.ipynb?content=1")
    assert r.status_code == 200, r.text[:300]
    assert "row:" not in r.text and '"extra"' not in r.text
    first, second, third = r.json()["content"]["cells"]
    fields = {"cell_type", "id", "metadata", "source", "execution_count", "outputs"}
    assert set(first) == set(second) == fields and set(third) == {"cell_type", "id", "metadata", "source"}
    # the first cell was withheld: a brand-new cell with the notice; none of it is the file's
    assert "withheld" in first["source"] and first["id"] != "a1" and first["execution_count"] is None
    assert set(first["metadata"]) <= {"trusted"}, first
    # the others passed, without the key; the second one's output, not in the format, is replaced
    assert second["source"] == "2+2" and second["execution_count"] == 2 and second["id"] == "a2"
    assert second["outputs"] == [
        {
            "output_type": "stream",
            "name": "stderr",
            "text": "This output is not in the notebook format and is not shown.\n",
        }
    ]
    assert third["source"] == "notes" and third["id"] not in ("a2", first["id"])  # a repeated id is replaced


def test_rows_in_full_width_digits_are_read_in_a_notebooks_outputs(world):
    """A notebook's outputs and metadata were checked as JSON with every non-ASCII character escaped
    (``\\uff17``): the row detection reads full-width digits as digits, but not their escapes, and the
    browser shows the digits. The gate now reads the text as it is shown."""
    _, server, _, home, user = world
    full = str.maketrans("0123456789.", "０１２３４５６７８９．")
    rows = "".join(f"row:{i},{i * 1.5}\n".translate(full) for i in range(1800, 1850))
    nb = nbformat.v4.new_notebook(metadata={})
    nb.cells = [
        nbformat.v4.new_code_cell("df", outputs=[nbformat.v4.new_output("stream", name="stdout", text=rows)]),
        nbformat.v4.new_markdown_cell("notes"),
    ]
    _put(home, user, "full-width.ipynb", nbformat.writes(nb).encode())
    r = server.get("/api/contents/full-width.ipynb?content=1")
    assert r.status_code == 200, r.text[:300]
    cells = r.json()["content"]["cells"]
    assert "row:" not in cells[0]["outputs"][0]["text"] and "output withheld" in cells[0]["outputs"][0]["text"]
    assert cells[1]["source"] == "notes"


def test_file_names_in_full_width_digits_are_read_in_a_listing(world):
    # the listing was checked as JSON with its names escaped: 50 rows in file names went out
    _, server, _, home, user = world
    full = str.maketrans("0123456789.", "０１２３４５６７８９．")
    folder = home / "full-width-names"
    folder.mkdir()
    os.chown(folder, user.pw_uid, user.pw_gid)
    for i in range(1900, 1950):
        _put(folder, user, f"row:{i} {i * 1.5}".translate(full), b"")
    r = server.get("/api/contents/full-width-names?content=1")
    assert r.status_code == 403 and "listing withheld" in r.json()["message"], r.text[:300]
    assert "row:" not in r.text


def test_a_table_behind_an_images_magic_number_is_not_served(world):
    # eight bytes in front of a CSV made it an image, served whole as base64 and counted, never read
    _, server, _, home, user = world
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(png, format="PNG")
    rows = "".join(f"row:{i},{i * 1.5}\n" for i in range(2000, 2100)).encode()
    for name, data in (("plot.png", b"\x89PNG\r\n\x1a\n" + rows), ("after-iend.png", png.getvalue() + rows)):
        _put(home, user, name, data)
        r = server.get(f"/api/contents/{name}?content=1")
        assert r.status_code == 403, (name, r.status_code, r.text[:300])
        assert "starts like an image but is not one" in r.json()["message"] and "airlock" in r.json()["message"]
        assert b"row:" not in base64.b64decode(r.json().get("content") or "")
    # what an image carries as text (a comment chunk here) is read for rows like any text
    data = png.getvalue()
    iend = data.rindex(b"IEND") - 4
    body = b"Comment\0" + rows
    chunk = len(body).to_bytes(4, "big") + b"tEXt" + body + zlib.crc32(b"tEXt" + body).to_bytes(4, "big")
    _put(home, user, "comment.png", data[:iend] + chunk + data[iend:])
    r = server.get("/api/contents/comment.png?content=1")
    assert r.status_code == 403 and "withheld" in r.json()["message"] and "row:" not in r.text, r.text[:300]


def test_a_file_that_does_not_parse_as_a_notebook_is_refused_without_quoting_it(world):
    _, server, _, home, user = world
    rows = "".join(f"row:{i},1.5\n" for i in range(1100, 1200))
    _put(
        home,
        user,
        "bad.ipynb",
        json.dumps({"nbformat": rows, "nbformat_minor": 5, "metadata": {}, "cells": []}).encode(),
    )
    r = server.get("/api/contents/bad.ipynb?content=1")
    assert r.status_code == 400 and "Unreadable Notebook: bad.ipynb" in r.json()["message"]
    assert "row:" not in r.text


def test_an_error_answered_to_a_contents_get_is_checked_too(world):
    # the contents manager checks the bodies it sends; an error's text (here the path asked for, which
    # jupyter_server quotes) goes through the output transform
    _, server, _, _, _ = world
    missing = "/".join(f"row:{i}" for i in range(1200, 1250))
    r = server.get(f"/api/contents/{missing}?content=1")
    assert r.status_code == 403 and r.json()["reason"] == "egress-withheld", r.text[:300] + server.logs()
    assert "row:" not in r.text
    assert server.get("/api/contents/row:1300?content=1").status_code == 404  # a few rows: the error itself


def test_a_files_name_size_and_times_are_checked_and_counted_with_its_body(world):
    """A kernel sets a file's times to any value it likes: six bytes of its choosing per GET, in the model's
    ``last_modified`` and ``Last-Modified`` header, beside an empty body. They are read by the gate with the
    body and counted against the day, for a file, a notebook and a folder's own model alike."""
    _, server, service, home, user = world
    folder = home / "stamps"
    folder.mkdir()
    os.chown(folder, user.pw_uid, user.pw_gid)
    for name, body in (("f0", b""), ("n0.ipynb", nbformat.writes(nbformat.v4.new_notebook()).encode())):
        _put(folder, user, name, body)
        os.utime(folder / name, ns=(0, int.from_bytes(b"row:42", "big") * 1000))
    os.utime(folder, ns=(0, int.from_bytes(b"DIRxyz", "big") * 1000))

    def day() -> int:
        return stored(service).day(user.pw_name, today()).bytes

    for path in ("stamps/f0", "stamps/n0.ipynb", "stamps"):
        before = day()
        r = server.get(f"/api/contents/{path}?content=1")
        assert r.status_code == 200, r.text
        described = {k: v for k, v in r.json().items() if k != "content"}
        stamp = datetime.datetime.fromisoformat(described["last_modified"].replace("Z", "+00:00"))
        micros = (stamp - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)) // datetime.timedelta(microseconds=1)
        assert micros.to_bytes(6, "big") in (b"row:42", b"DIRxyz")  # the six bytes are there ...
        assert day() - before >= len(json.dumps(described)) * 0.9, (path, before, day())  # ... and counted


def test_a_file_that_appears_between_two_looks_at_its_path_is_not_sent_unchecked(world):
    """The manager looked at a path, found nothing, and asked the stock manager, which looked again and sent
    what it found there whole: a kernel renaming a data file in and out of a path every millisecond got it
    out about once in sixty reads, unchecked and uncounted. Now nothing the manager did not check leaves:
    a data file is refused whichever look finds it."""
    import subprocess
    import sys

    _, server, service, home, user = world
    toggle = """
import os, time
os.makedirs("racedir", exist_ok=True)
with open("racedir/race.src", "wb") as f:
    f.write(b"PAR1" + "".join(f"row:{i},{i * 1.5}\\n" for i in range(300)).encode())
end = time.monotonic() + 8
while time.monotonic() < end:
    os.rename("racedir/race.src", "racedir/race.bin")
    t = time.perf_counter()
    while time.perf_counter() - t < 0.001:
        pass
    os.rename("racedir/race.bin", "racedir/race.src")
    t = time.perf_counter()
    while time.perf_counter() - t < 0.001:
        pass
"""
    as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    proc = subprocess.Popen([*as_user, sys.executable, "-c", toggle], cwd=str(home))
    codes: dict[int, int] = {}
    try:
        time.sleep(0.5)
        end = time.monotonic() + 6
        while time.monotonic() < end:
            r = server.get("/api/contents/racedir/race.bin?content=1")
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            assert r.status_code != 200 and b"row:1" not in r.content, (r.status_code, r.content[:200])
    finally:
        proc.kill()
        proc.wait()
    assert sum(codes.values()) > 100 and codes.get(403, 0) > 0, codes  # the file was found, and refused


def test_a_listing_is_checked_whole_and_counted_again_only_when_it_changed(world):
    # sizes and times in a listing are values the kernel sets (truncate, utime): they count like the names
    _, server, service, home, user = world
    folder = home / "sizes"
    folder.mkdir()
    os.chown(folder, user.pw_uid, user.pw_gid)
    values = [17990, 10380, 122800, 10010]
    for n, v in enumerate(values):
        with open(folder / f"f{n}", "wb") as f:
            f.truncate(v)
        os.utime(folder / f"f{n}", ns=(0, 1_700_000_000_000_000_000 + v * 1000))
        os.chown(folder / f"f{n}", user.pw_uid, user.pw_gid)

    def day() -> int:
        return stored(service).day(user.pw_name, today()).bytes

    before = day()
    r = server.get("/api/contents/sizes?content=1")
    assert r.status_code == 200 and sorted(e["size"] for e in r.json()["content"]) == sorted(values)
    listed = len(json.dumps(r.json()["content"]))
    first = day()
    assert first - before >= listed * 0.9, (before, first, listed)
    # the file browser asks again every few seconds: the same listing is not counted again
    assert server.get("/api/contents/sizes?content=1").status_code == 200
    assert day() == first
    os.utime(folder / "f0", ns=(0, 1_700_000_000_000_000_000 + 55555 * 1000))
    assert server.get("/api/contents/sizes?content=1").status_code == 200
    assert day() >= first + listed * 0.9
    # a model without content (size, times) goes through the output transform and is counted too
    then = day()
    r = server.get("/api/contents/sizes/f2?content=0")
    assert r.status_code == 200 and r.json()["size"] == 122800
    assert day() >= then + len(r.content)


def test_images_pass_and_count_against_the_day(world):
    _, server, service, home, user = world
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buf, format="PNG")
    _put(home, user, "plot.png", buf.getvalue())
    before = stored(service).day(user.pw_name, today()).bytes
    r = server.get("/api/contents/plot.png?content=1")
    assert r.status_code == 200 and base64.b64decode(r.json()["content"]) == buf.getvalue()
    assert stored(service).day(user.pw_name, today()).bytes >= before + len(buf.getvalue())


def test_other_api_responses_pass_the_transform_and_are_counted(world):
    _, server, service, _, user = world
    before = stored(service).day(user.pw_name, today()).outputs
    assert server.get("/api/sessions").status_code == 200
    assert server.get("/api/kernels").status_code == 200
    assert stored(service).day(user.pw_name, today()).outputs >= before + 2


def test_a_checked_response_carries_no_hash_of_its_body_and_answers_no_guess(world):
    # tornado hashes a body (Etag) and answers 304 to a matching If-None-Match before the output transform
    # reads it: for a body the gate withholds, the hash and the 304 would confirm a guess at it
    _, server, _, _, _ = world
    kernel = server.start_kernel()
    rows = "-".join(f"row:{i}" for i in range(1300, 1350))
    # the server records the state a kernel reports (after the cell's own idle, here) and lists it
    res = server.run(
        "import threading\n"
        "k, parent = get_ipython().kernel, get_ipython().kernel.get_parent()\n"
        f"state = {{'execution_state': {rows!r}}}\n"
        "threading.Timer(0.5, lambda: k.session.send(k.iopub_socket, 'status', state, parent=parent)).start()",
        kernel,
    )
    assert res.error is None
    deadline = time.monotonic() + 20
    while (r := server.get(f"/api/kernels/{kernel}")).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.status_code == 403 and r.json()["reason"] == "egress-withheld" and "row:" not in r.text
    assert "Etag" not in r.headers
    server.run("k = get_ipython().kernel", kernel)  # its state is the kernel's own again
    r = server.get(f"/api/kernels/{kernel}")
    assert r.status_code == 200 and "Etag" not in r.headers
    guess = '"' + hashlib.sha1(r.content).hexdigest() + '"'  # noqa: S324 - tornado's Etag is a SHA-1
    assert server.get(f"/api/kernels/{kernel}", headers={"If-None-Match": guess}).status_code == 200
    assert server.get(f"/api/kernels/{kernel}", headers={"If-None-Match": "*"}).status_code == 200


UNCHECKED = 6000
"""The unchecked allowance of the server whose egress service is down (small, so the test is quick)."""


def test_while_the_service_is_down_a_drip_of_rows_stops_at_the_unchecked_allowance(world_tmp, make_system_user):
    """Attack: with the egress service down, print rows one small piece at a time (each far under
    fail_closed_bytes), over several cells, each on a new websocket. What reaches the client is bounded by
    the server's unchecked allowance; the rest is withheld with the notice, until the service answers again."""
    site = make_site(world_tmp, {"onc": ["bc"]}, egress={"unchecked_bytes": UNCHECKED})
    publish(site, "onc", "bc", "a,b\n1,2\n")
    user = make_system_user("unchecked")
    drip = (
        "import time\nfor i in range({first}, {last}):\n"
        "    print(f'row:{{i}},' + 'x' * 90, flush=True); time.sleep(0.005)"
    )
    with UserServer(site, user, ("onc",), world_tmp, start_egress=False) as server:
        assert not socket_path(site).exists()
        kernel = server.start_kernel()
        results = [server.run(drip.format(first=i * 60, last=i * 60 + 60), kernel) for i in range(5)]
        shown = "".join(r.stdout for r in results)
        # 300 rows of ~100 bytes were printed: what came through fits in the allowance
        assert 0 < len(shown.encode()) <= UNCHECKED and shown.count("row:") < 60, len(shown)
        assert all(r.reply is not None for r in results)  # the cells ran and finished; only output was held
        assert "may pass unchecked" in results[-1].stderr and "row:" not in results[-1].stdout
        # the allowance is the server's, for every channel: API responses are withheld now too
        r = server.get("/api/kernels")
        assert r.status_code == 403 and r.json()["reason"] == "egress-withheld", r.text[:300]
        store = EgressStore.for_site(site)
        service = EgressService(site, store, MarkedRows(site), Registry.for_state_dir(site.state_dir))
        egress = EgressServer(socket_path(site), service, group=workspacegroup.gid())
        egress.start_in_thread()
        try:
            back = server.run(drip.format(first=1000, last=1005), kernel)
            assert back.stdout.count("row:") == 5 and "withheld" not in back.stderr, back.stderr
        finally:
            egress.shutdown()
            egress.server_close()
            service.close()
            store.close()


def test_a_text_file_over_the_contents_cap_is_refused_and_one_under_it_is_served(world):
    site, server, _, home, user = world
    cap = site.egress_for_user(("onc",)).contents_bytes
    assert cap == 2_000_000  # the default [egress] contents_bytes
    line = b"the model converged after a few more epochs of careful tuning and review\n"
    _put(home, user, "notes-big.txt", line * (cap // len(line) + 1))  # a line over the cap
    r = server.get("/api/contents/notes-big.txt?content=1&type=file&format=text")
    assert r.status_code == 403, r.text[:300]
    assert r.json()["message"] == (
        "notes-big.txt is larger than 2,000,000 bytes and is not opened in the browser. It stays in your home: "
        "work with it in a notebook, or request an export through the airlock."
    )
    under = line * (cap // len(line))
    assert cap - len(line) < len(under) <= cap
    _put(home, user, "notes.txt", under)
    r = server.get("/api/contents/notes.txt?content=1&type=file&format=text")
    assert r.status_code == 200, r.text[:300]
    assert r.json()["content"].encode() == under


def test_a_python_source_file_uploaded_through_the_contents_api_is_saved_and_read_back(world):
    _, server, _, home, user = world
    source = (
        '"""Helpers for the analysis."""\n\nimport math\n\n\ndef mean(xs):\n    return sum(xs) / len(xs)\n\n\n'
        "def spread(xs):\n    m = mean(xs)\n    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))\n"
    )
    r = server.request("PUT", "/api/contents/helpers.py", json={"type": "file", "format": "text", "content": source})
    assert r.status_code == 201, r.text[:300]
    saved = home / "helpers.py"
    assert saved.read_text() == source and saved.stat().st_uid == user.pw_uid  # written as the researcher
    r = server.get("/api/contents/helpers.py?content=1&type=file&format=text")
    assert r.status_code == 200, r.text[:300]
    assert r.json()["content"] == source and r.json()["mimetype"] == "text/plain"
    res = server.run("import sys; sys.path.insert(0, '.'); import helpers; print(helpers.mean([1, 2, 3]))")
    assert res.stdout == "2.0\n", res  # and the sandboxed kernel imports it from the home
