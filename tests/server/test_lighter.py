"""The user's server and kernel processes start without what they never use: the grammar jsonschema would
compile for one string format, and the kernel's debugger (the kernel spec turns it off)."""

from __future__ import annotations

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
