"""The user's server process starts without the grammar jsonschema would compile for one string format."""

from __future__ import annotations

import subprocess
import sys

from paitient.hub.paths import SERVER_MODULE, server_argv

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
