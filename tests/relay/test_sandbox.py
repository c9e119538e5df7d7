"""A real kernel in bubblewrap, started by the pod's launcher, which runs the pod's relay in its process (as
the kernels container does): the kernel reaches the audit trail through the relay as its user, marked as a
kernel with its own pid, and it can neither read the pod's token nor reach the egress gate's socket. The relay
refuses a token a sandbox would bind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.launcher.asking import connection_file
from tests.launcher.test_pod import RUN_CELL, as_account, line_of, pod_launcher
from tests.trail import trail_records

CELL = """
import json, os, socket
try:
    open(TOKEN).read()
    token = "READ"
except OSError as e:
    token = e.errno
gate = socket.socket(socket.AF_UNIX)
try:
    gate.connect(EGRESS)
    egress = "CONNECTED"
except OSError as e:
    egress = e.errno
s = socket.socket(socket.AF_UNIX)
s.connect(RUN + "/audit.sock")
request = {"op": "record", "args": {"action": "cell.execute", "object": "in the sandbox"}}
s.sendall(json.dumps(request).encode() + b"\\n")
answer = json.loads(s.makefile().readline())
env = "\\n".join(os.environ.values())
print(json.dumps({"token": token, "egress": egress, "answer": answer, "pid": os.getpid(), "env": env}))
"""


def test_a_sandboxed_kernel_reaches_the_audit_trail_through_the_relay_and_cannot_read_the_token(pod):
    user = pod.user
    egress = pod.egress_sock
    relay = (
        f"--gateway=127.0.0.1:{pod.gateway_port}",
        f"--token-file={pod.token_path}",
        "--report-seconds=0.3",
        f"--egress-socket={egress}",
        f"--gateway-ca={pod.authority}",
    )
    with pod_launcher(user, pod.sockets, pod.tmp / "data", *relay):
        deadline = time.monotonic() + 30
        while not (pod.sock("audit").exists() and egress.exists()):
            assert time.monotonic() < deadline, "the launcher's relay made no socket"
            time.sleep(0.05)
        conn = connection_file(user)
        client = subprocess.Popen(
            [
                *as_account(user),
                sys.executable,
                "-c",
                textwrap.dedent(RUN_CELL),
                str(pod.sockets / "launcher.sock"),
                json.dumps({"connection_file": str(conn), "kernel": "python3"}),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={"PATH": "/usr/bin:/bin"},
        )
        try:
            started = line_of(client)
            assert "ok" in started, started
            code = (
                CELL.replace("TOKEN", repr(str(pod.token_path)))
                .replace("RUN", repr(str(pod.run_dir)))
                .replace("EGRESS", repr(str(egress)))
            )
            client.stdin.write(json.dumps({"connection_file": str(conn), "code": code}) + "\n")
            client.stdin.flush()
            cell = line_of(client)
            assert cell["status"] == "ok", cell
            seen = json.loads(cell["stdout"])
            records = [r for r in trail_records(pod.site, action="cell.execute") if r["object"] == "in the sandbox"]
            assert len(records) == 1, records
            peer = records[0]["details"]["peer"]
            # the pid recorded is the kernel's as the relay sees it: in the kernel's own pid namespace it is the
            # pid the kernel knows itself by
            nspid = [line for line in Path(f"/proc/{peer['pid']}/status").read_text().splitlines() if "NSpid" in line]
            assert int(nspid[0].split()[-1]) == seen["pid"], nspid
        finally:
            client.stdin.close()
            client.wait(timeout=30)
    assert seen["token"] == 2  # ENOENT: the token's folder is not in the sandbox at all
    assert seen["egress"] == 2  # nor the egress gate's socket, which the launcher's relay serves beside its own
    assert pod.token not in seen["env"]
    assert seen["answer"]["ok"] is True, seen
    assert records[0]["actor"] == "alice"
    assert peer["origin"] == "kernel" and peer["pod"] == pod.identity.pod and peer["uid"] == user.pw_uid


@pytest.mark.parametrize("where", ["home", "run dir", "root"])
def test_the_relay_refuses_a_token_a_sandbox_binds_and_to_run_as_root(pod, where):
    user = pod.user
    token = {"home": f"{user.pw_dir}/token", "run dir": f"{pod.run_dir}/token"}.get(where, str(pod.token_path))
    if where != "root":
        Path(token).parent.mkdir(exist_ok=True)
        Path(token).write_text(pod.token)
        os.chown(token, user.pw_uid, user.pw_gid)
    argv = pod.relay_argv(f"--token-file={token}")
    if where == "root":
        argv = argv[argv.index(sys.executable) :]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    said = "refusing to run as root" if where == "root" else f"lies in the {where} folder"
    assert r.returncode == 2 and said in r.stderr, r.stderr
    assert not pod.sock("audit").exists()
