"""Export attacks against a real user server: downloads, exports, paths outside the home, terminals, output."""

import asyncio
import json
import os
from pathlib import Path

import pytest

from paitient.hub.serverconfig import DISABLED_LAB_PLUGINS


def _forbidden(r):
    assert r.status_code == 403, (r.status_code, r.text[:300])
    assert r.json()["reason"] == "export-disabled"


@pytest.mark.parametrize(
    "path",
    [
        "/files/notes.txt",
        "/files/notes.txt?download=1",
        "/view/notes.txt",
        "/nbconvert/html/nb.ipynb?download=true",
        "/nbconvert/script/nb.ipynb",
        "/api/nbconvert",
    ],
)
def test_raw_download_and_nbconvert_routes_are_refused(world, path):
    _forbidden(world.server_a.get(path))


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/view"),  # the stock page of a file, at a URL no pattern of handlers.BLOCKED covers
        ("GET", "/view/"),
        ("GET", "/lab/api/build"),  # JupyterLab's build
        ("POST", "/lab/api/build"),
    ],
)
def test_routes_classified_refused_are_refused_whatever_their_url(world, method, path):
    _forbidden(world.server_a.request(method, path))


def test_the_event_stream_websocket_opens_and_carries_no_event(world):
    """The stock socket streamed the contents events (each file's path as it was saved or renamed). It is
    answered with a socket that stays open and silent, so JupyterLab does not subscribe again and again."""
    from tornado.httpclient import HTTPClientError, HTTPRequest
    from tornado.websocket import websocket_connect

    server = world.server_a
    url = server.url.replace("http://", "ws://", 1) + "/api/events/subscribe"
    secret = "events-probe-7c1f"

    async def subscribe_and_save():
        with pytest.raises(HTTPClientError) as anonymous:
            await websocket_connect(HTTPRequest(url))
        socket = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"token {server.token}"}))
        loop = asyncio.get_running_loop()

        def act():
            file = {"type": "file", "format": "text", "content": "x"}
            for r in (
                server.request("PUT", f"/api/contents/{secret}.txt", json=file),
                server.request("PATCH", f"/api/contents/{secret}.txt", json={"path": f"{secret}-renamed.txt"}),
                server.request("DELETE", f"/api/contents/{secret}-renamed.txt"),
            ):
                assert r.status_code in (200, 201, 204), (r.status_code, r.text[:200])

        await loop.run_in_executor(None, act)
        await socket.write_message(json.dumps({"schema_id": "x", "version": "1", "data": {"path": secret}}))
        heard = []
        try:
            while True:
                message = await asyncio.wait_for(socket.read_message(), timeout=3)
                if message is None:
                    break
                heard.append(message)
        except TimeoutError:
            still_open = socket.protocol is not None
        else:
            still_open = False
        socket.close()
        return anonymous.value.code, heard, still_open

    anonymous, heard, still_open = asyncio.run(subscribe_and_save())
    assert anonymous == 403
    assert heard == []
    assert still_open


def test_nbconvert_post_is_refused(world):
    _forbidden(world.server_a.request("POST", "/nbconvert/html", json={"content": {}}))


def test_contents_api_inside_the_home_works(world):
    r = world.server_a.get("/api/contents/notes.txt?content=1")
    assert r.status_code == 200 and r.json()["content"] == "alice's notes\n"


@pytest.mark.parametrize("path", ["..%2f..%2f..%2fetc%2fpasswd", "%2e%2e/%2e%2e/etc/passwd", "..%2f" + "bob"])
def test_contents_api_dot_dot_is_refused(world, path):
    r = world.server_a.get(f"/api/contents/{path}")
    assert r.status_code in (400, 404), (r.status_code, r.text[:200])
    assert "passwd" not in r.text or "root:" not in r.text


@pytest.fixture
def symlinks(world):
    home = Path(world.alice.pw_dir)
    links = {
        "other-project": world.site.data_root / "card" / "dia" / "current",
        "etc-passwd": Path("/etc/passwd"),
        "root-dir": Path("/"),
        "state": world.site.state_dir,
    }
    for name, target in links.items():
        os.symlink(target, home / name)
        os.lchown(home / name, world.alice.pw_uid, world.alice.pw_gid)
    yield links
    for name in links:
        (home / name).unlink()


@pytest.mark.parametrize(
    "path",
    [
        "other-project/data.csv",
        "other-project",
        "etc-passwd",
        "root-dir",
        "root-dir/etc/hostname",
        "state/accounts.json",
    ],
)
def test_contents_api_through_symlinks_is_refused(world, symlinks, path):
    r = world.server_a.get(f"/api/contents/{path}?content=1")
    assert r.status_code == 404 and "outside the home" in r.json()["message"], (r.status_code, r.text[:200])


def test_contents_api_cannot_write_through_a_symlink(world, symlinks):
    r = world.server_a.request(
        "PUT", "/api/contents/root-dir/tmp/planted.txt", json={"type": "file", "format": "text", "content": "x"}
    )
    assert r.status_code == 404, (r.status_code, r.text[:200])
    assert not Path("/tmp/planted.txt").exists()


def test_hidden_files_are_not_served(world):
    home = Path(world.alice.pw_dir)
    (home / ".secret-notes").write_text("hidden")
    r = world.server_a.get("/api/contents/.secret-notes?content=1")
    assert r.status_code == 404, (r.status_code, r.text[:200])


@pytest.mark.parametrize(
    "method,path", [("GET", "/api/terminals"), ("POST", "/api/terminals"), ("GET", "/terminals/websocket/1")]
)
def test_terminals_do_not_exist(world, method, path):
    r = world.server_a.request(method, path)
    assert r.status_code == 404, (r.status_code, r.text[:200])


def test_lab_page_config_disables_download_and_export(world):
    r = world.server_a.get("/lab")
    assert r.status_code == 200
    start = r.text.index('id="jupyter-config-data"')
    blob = r.text[r.text.index(">", start) + 1 : r.text.index("</script>", start)]
    disabled = json.loads(blob)["disabledExtensions"]
    for plugin in DISABLED_LAB_PLUGINS:
        assert plugin in disabled


def test_a_chosen_kernel_id_cannot_leave_the_runtime_dir(world):
    r = world.server_a.request("POST", "/api/kernels", json={"name": "python3", "kernel_id": "../../../../tmp/x"})
    assert r.status_code == 400 and "UUID" in r.json()["message"], (r.status_code, r.text[:200])


# -- the output cap (site: 100 kB per message, 400 kB per execution) -------------------------------


def test_a_huge_cell_output_is_cut_per_execution(alice_kernel):
    res = alice_kernel.run("for _i in range(200): print('x' * 49_000, flush=True)")  # ~9.8 MB, 200 messages
    assert "exceeded 400,000 bytes" in res.stderr
    assert len(res.stdout) < 400_000
    assert res.wire_bytes < 460_000, res.wire_bytes


def test_one_huge_message_is_cut(alice_kernel):
    res = alice_kernel.run("print('y' * 2_000_000)")
    assert res.stdout.startswith("y" * 1000) and "exceeded 100,000 bytes" in res.stdout
    assert len(res.stdout) < 100_000 and res.wire_bytes < 120_000, res.wire_bytes


def test_a_huge_rich_display_is_replaced(alice_kernel):
    res = alice_kernel.run("from IPython.display import display\ndisplay({'text/html': 'z' * 500_000}, raw=True)")
    shown = [o for o in res.outputs if o["msg_type"] == "display_data"]
    assert len(shown) == 1 and "exceeded 100,000 bytes" in shown[0]["content"]["data"]["text/plain"]
    assert "text/html" not in shown[0]["content"]["data"]


def test_forged_parent_ids_do_not_open_new_budgets(alice_kernel):
    # The kernel sends its own messages under invented parents, hoping each gets a fresh budget.
    res = alice_kernel.run(
        "import uuid\n"
        "_k = get_ipython().kernel\n"
        "for _i in range(60):\n"
        "    _k.session.send(_k.iopub_socket, 'stream', {'name': 'stdout', 'text': 'w' * 90_000},\n"
        "                    parent={'header': {'msg_id': uuid.uuid4().hex, 'msg_type': 'execute_request'}})\n"
        "import time; time.sleep(0.5)\n"
    )
    assert res.wire_bytes < 460_000, res.wire_bytes  # 5.4 MB were sent by the kernel


def test_past_the_execution_cap_made_up_replies_and_comm_closes_carry_nothing(alice_kernel):
    # Past the budget, replies still go (stripped) and used to keep an execution count and a comm id, so a
    # kernel sent one reply after another, each with a number of its choosing.
    res = alice_kernel.run(
        "import time\n"
        "_k, _p = get_ipython().kernel, get_ipython().kernel.get_parent()\n"
        "_send = lambda kind, content: _k.session.send(_k.iopub_socket, kind, content, parent=_p)\n"
        "for _i in range(9): print('x' * 49_000, flush=True)\n"  # past 400 kB
        "time.sleep(0.5)\n"
        "for _i in range(200):\n"
        "    _send('x_reply', {'status': 'ok', 'execution_count': 7 ** 400 + _i})\n"
        "    _send('execute_reply', {'status': 'ok', 'execution_count': 5 ** 400})\n"
        "    _send('comm_close', {'comm_id': 'Q' * 64, 'data': {}})\n"
        "    _send('kernel_info_reply', {'status': 'ok', 'language_info': {'name': 'Z' * 3000}})\n"
        "time.sleep(1)\n"
    )
    wire = b"".join(res.frames)
    assert "exceeded 400,000 bytes" in res.stderr
    assert str(7**400)[:40].encode() not in wire and str(5**400)[:40].encode() not in wire
    assert b"Q" * 64 not in wire and b"Z" * 100 not in wire
    # one reply to the request (the first the kernel sent, past the cap: stripped of its count)
    assert res.reply == {"status": "ok"}
    replies = [o for o in res.outputs if o["msg_type"].endswith("_reply")]
    assert [o["msg_type"] for o in replies] == ["execute_reply"], replies
    assert res.wire_bytes < 460_000, res.wire_bytes


@pytest.mark.parametrize(
    "name,query",
    [
        ("dump.csv", "content=1"),
        ("dump.csv", "content=1&format=base64"),
        ("dump.ipynb", "content=1"),
        ("dump.ipynb", "content=1&type=file"),
    ],
)
def test_a_data_dump_written_by_the_kernel_is_not_sent_by_the_contents_api(world, alice_kernel, name, query):
    # The kernel copies data into the home (allowed: the home is its workspace); the server will not
    # send a file that large to the browser (site: contents_cap_bytes = 1,000,000).
    if name.endswith(".ipynb"):
        code = (
            "json.dump({'cells': [{'cell_type': 'code', 'source': '', 'metadata': {}, 'execution_count': 1,"
            " 'outputs': [{'output_type': 'stream', 'name': 'stdout', 'text': open('/data/onc/bc/data.csv')"
            ".read() * 200_000}]}], 'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}, "
            f"open({world.alice.pw_dir + '/' + name!r}, 'w'))"
        )
    else:
        code = f"open({world.alice.pw_dir + '/' + name!r}, 'w').write(open('/data/onc/bc/data.csv').read() * 200_000)"
    assert alice_kernel.attempt(code)["ok"]
    r = world.server_a.get(f"/api/contents/{name}?{query}")
    assert r.status_code == 403 and "larger than 1,000,000 bytes" in r.json()["message"], (r.status_code, r.text[:200])
    listing = world.server_a.get("/api/contents/?content=1").json()["content"]
    assert name in [e["name"] for e in listing]  # still there, and listed: only its content is held back


def test_lab_extension_manager_cannot_query_an_index(world, make_system_user):
    # A search in the extension manager would send the query text from the server to a package index. The
    # server's own namespace (hub/servernet.py) reaches only the hub's API; this server runs without it, so
    # the config alone is what is tested: all its outbound HTTP goes to a loopback listener, and nothing
    # arrives.
    import socket

    from tests.server.harness import UserServer

    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen(4)
    proxy = f"http://127.0.0.1:{trap.getsockname()[1]}"
    user = make_system_user("extmgr")
    env = {"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy, "https_proxy": proxy}
    try:
        with UserServer(world.site, user, ("onc",), world.root, extra_env=env) as server:
            page = server.get("/lab").text
            blob = page[page.index(">", page.index('id="jupyter-config-data"')) + 1 :]
            manager = json.loads(blob[: blob.index("</script>")])["extensionManager"]
            assert manager["name"] == "read-only" and manager["can_install"] is False
            r = server.get("/lab/api/extensions?query=CARD-SECRET&page=1&per_page=5")
            assert r.status_code == 200 and "CARD-SECRET" not in r.text
            r = server.request("POST", "/lab/api/extensions", json={"cmd": "install", "extension_name": "x"})
            assert r.status_code != 200 or r.json().get("status") != "ok", r.text[:300]
        trap.setblocking(False)
        try:
            trap.accept()
            reached = True
        except BlockingIOError:
            reached = False
        assert not reached, "the server made an outbound request"
    finally:
        trap.close()


def test_lab_settings_workspaces_and_notebook_trust_are_out_of_the_kernels_reach(world, alice_kernel):
    # The settings and workspaces APIs send files back as they are; the kernel cannot plant any.
    state = world.server_a.config_dir.parent / "state"
    assert state.stat().st_uid == world.alice.pw_uid
    out = alice_kernel.attempt(f"os.listdir({str(state)!r})")
    assert out["errno"] == "ENOENT", out
    home_ws = f"{world.alice.pw_dir}/.jupyter/lab/workspaces"
    planted = (
        "os.makedirs(%r, exist_ok=True) or open(%r + '/loot.jupyterlab-workspace', 'w').write("
        "json.dumps({'data': {'x': open('/data/onc/bc/data.csv').read()}, 'metadata': {'id': 'loot'}}))"
    )
    assert alice_kernel.attempt(planted % (home_ws, home_ws))["ok"]
    r = world.server_a.get("/lab/api/workspaces")
    assert r.status_code == 200 and "loot" not in r.text and "id,size" not in r.text
