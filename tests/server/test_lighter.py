"""The user's server and kernel processes start without what they never use: the grammar jsonschema would
compile for one string format, JupyterHub's database layer, and the kernel's debugger (the kernel spec turns
it off). That the real server, started by the hub, signs in, serves and runs cells this way is
tests/e2e/test_workspace.py::test_the_users_server_serves_without_the_hubs_database_layer."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from jupyter_client import BlockingKernelClient

from paitient.hub.paths import SERVER_MODULE, server_argv
from paitient.rules.sandbox import kernel_argv

PROBE = """
import sys, time
from paitient.server import singleuser
start = time.process_time()
if sys.argv[1] == "lighter":
    singleuser.skip_unneeded()
import jupyter_server.serverapp
from jsonschema import FormatChecker
checker = FormatChecker()
print(sys.modules.get("rfc3987_syntax") is not None, "iri" in checker.checkers)
print(checker.conforms("2026-12-04", "date"), checker.conforms("not a date", "date"))
"""


def probe(mode: str) -> list[str]:
    out = subprocess.run([sys.executable, "-I", "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_the_server_skips_the_iri_grammar_and_keeps_every_other_format():
    assert probe("lighter") == ["False", "False", "True", "False"]
    # without it, the same imports load the grammar (so the skip is what leaves it out)
    assert probe("plain")[:2] == ["True", "True"]


HUB_PROBE = """
import json, sys, warnings
from paitient.server import singleuser
if sys.argv[1] == "lighter":
    singleuser.skip_unneeded()
else:
    sys.modules["rfc3987_syntax"] = None
from jupyterhub.singleuser import main  # what the server's main imports, then what the server loads
import jupyterhub.singleuser.extension, jupyter_server.serverapp, jupyterlab.labapp, paitient.server.app
from jupyterhub.services.auth import check_scopes

heavy = ("sqlalchemy", "alembic", "jupyterhub.orm", "jupyterhub.roles", "jupyterhub.handlers", "jupyterhub.user",
         "httpx._main", "rich", "click")
loaded = sorted(
    name for name, module in sys.modules.items()
    if any(name == h or name.startswith(h + ".") for h in heavy)
    and module is not None and not isinstance(module, singleuser.LeftOut)
)
warnings.simplefilter("ignore")  # a group filter without a database warns that it cannot resolve it
checks = [sorted(check_scopes(required, set(held))) for required, held in json.loads(sys.argv[2])]
import httpx  # the library still works; only its command-line client is absent
client = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200, text="ok")))
auth = "jupyterhub.services.auth" in sys.modules and client.get("http://127.0.0.1/").text == "ok"
print(json.dumps({"loaded": loaded, "checks": checks, "auth": auth}))
"""

# (the scope a request needs, the scopes its token holds): what the server's sign-in check decides
ALICES_SERVER = "access:servers!server=alice/"
SCOPE_CASES = [
    (ALICES_SERVER, ["access:servers!user=alice", "read:users:name!user=alice"]),  # alice herself
    (ALICES_SERVER, ["access:servers!server=alice/"]),
    (ALICES_SERVER, ["access:servers"]),  # an admin
    (ALICES_SERVER, ["access:servers!user=bob", "access:servers!server=bob/"]),  # bob
    (ALICES_SERVER, ["access:servers!server=alice/other"]),  # another server of alice's
    (ALICES_SERVER, ["access:servers!group=oncology"]),  # a group: not resolved without the hub's database
    (ALICES_SERVER, ["read:users!user=alice"]),
]


def hub_probe(mode: str) -> dict:
    cases = json.dumps(SCOPE_CASES)
    out = subprocess.run(
        [sys.executable, "-I", "-c", HUB_PROBE, mode, cases], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_server_loads_no_database_layer_and_decides_scopes_as_before():
    lighter, plain = hub_probe("lighter"), hub_probe("plain")
    assert lighter["loaded"] == [] and lighter["auth"]
    # the same imports without the placeholders load all of it (so they are what leaves it out)
    assert {"sqlalchemy", "alembic", "jupyterhub.orm", "jupyterhub.handlers.base", "rich"} <= set(plain["loaded"])
    # the sign-in check is JupyterHub's, unchanged: only alice's own token or an admin's reach her server
    assert lighter["checks"] == plain["checks"]
    assert lighter["checks"] == [[ALICES_SERVER]] * 3 + [[]] * 4


LOUD_PROBE = """
import sys
from paitient.server import singleuser
singleuser.skip_unneeded()
import jupyterhub.orm
results = []
try:
    jupyterhub.orm.User
except singleuser.LeftOutError as e:
    results.append(str(e))
ways_in = ("from sqlalchemy import func", "import sqlalchemy.orm", "import alembic", "import jupyterhub.handlers")
for statement in ways_in:
    try:
        exec(statement)
    except (ImportError, singleuser.LeftOutError) as e:
        results.append(type(e).__name__)
    else:
        results.append("imported")
print("\\n".join(results))
"""


def test_a_jupyterhub_that_needs_what_is_left_out_fails_loudly_instead_of_loading_it():
    out = subprocess.run([sys.executable, "-I", "-c", LOUD_PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    message, *imports = out.stdout.splitlines()
    assert message.startswith("jupyterhub.orm.User: the user's server leaves jupyterhub.orm out")
    assert "remove it from that list" in message  # the error says what to do
    # nor can the database layer come in another way: each of these needs SQLAlchemy or the ORM, and fails
    assert len(imports) == 4 and set(imports) <= {"ImportError", "ModuleNotFoundError", "LeftOutError"}, imports


def test_the_spawners_run_the_lighter_server():
    assert server_argv("/venv/bin/python") == ["/venv/bin/python", "-I", "-m", SERVER_MODULE]
    # the module is JupyterHub's single-user application: its options are that application's
    help_text = subprocess.run([*server_argv(), "--help-all"], capture_output=True, text=True, timeout=120, cwd="/")
    assert help_text.returncode == 0 and "--JupyterHubSingleUser.hub_activity_interval" in help_text.stdout


def test_the_kernel_runs_cells_without_its_debugger(tmp_path):
    connection = tmp_path / "kernel.json"
    argv = [a.replace("{connection_file}", str(connection)) for a in kernel_argv(sys.executable)]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = BlockingKernelClient()
    try:
        deadline = time.monotonic() + 60
        while not connection.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.2)  # the kernel writes the file once, then listens
        client.load_connection_file(str(connection))
        client.start_channels()
        client.wait_for_ready(timeout=60)
        out: list[dict] = []
        code = "import sys; print(sys.modules.get('debugpy', 'missing'), 6 * 7)"
        reply = client.execute_interactive(code, timeout=60, output_hook=out.append)
        assert reply["content"]["status"] == "ok"
        printed = "".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")
        assert printed == "None 42\n"  # debugpy marked absent, and the cell ran
        info = client.kernel_info(reply=True, timeout=30)["content"]
        assert info["status"] == "ok" and "debugger" not in info.get("supported_features", [])
    finally:
        client.stop_channels()
        proc.terminate()
        proc.wait(10)
