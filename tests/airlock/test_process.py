"""The airlock as the hub runs it: its service entry and scopes as JupyterHub reads them, and the real
``paitient service airlock`` process stopped and started again with every request and decision kept."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from paitient.config import load
from paitient.services.airlock.service import custom_scopes, hub_service, role_scopes
from paitient.services.airlock.store import Store
from tests.airlock.helpers import give, register, run_as

SITE_TOML = """
[workspace]
state_dir = "{state}"

[[projects]]
name = "oncology"
group = "oncology"
datasets = ["breast_cancer"]
stewards = ["sam", "steph"]
self_reported_weights = "two-person"
self_reported_reason = "checked against certified models"
table_labels = ["stage", "I", "II"]
"""


def test_jupyterhub_accepts_the_service_entry_and_scopes(tmp_path):
    site_file = tmp_path / "site.toml"
    site_file.write_text(SITE_TOML.format(state=tmp_path / "state"))
    site = load(site_file)
    entry = hub_service(site, "/opt/paitient/venv/bin/python", port=8123)
    assert entry["url"] == "http://127.0.0.1:8123"
    assert entry["command"][-3:] == ["airlock", f"--state-dir={site.state_dir}", f"--site={site_file.resolve()}"]
    # JupyterHub's own checks, in a separate interpreter (custom scopes are process-global there).
    code = f"""
import json
from jupyterhub import scopes
from jupyterhub.services.service import Service
scopes.define_custom_scopes({custom_scopes()!r})
entry = {entry!r}
fields = Service().traits(input=True)
assert set(entry) <= set(fields), set(entry) - set(fields)
for role, granted in {role_scopes()!r}.items():
    scopes._check_scopes_exist(granted, who_for=role)
print(json.dumps(sorted(scopes.scope_definitions)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert {"custom:airlock:request", "custom:airlock:review", "custom:airlock:download"} <= set(json.loads(out))
    assert set(entry["oauth_client_allowed_scopes"]) == set(custom_scopes())


def _start(site_file: Path, state: Path, port: int, *extra: str, hub_env: bool = True) -> subprocess.Popen:
    env = {
        **os.environ,
        "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{port}",
        "JUPYTERHUB_SERVICE_PREFIX": "/services/airlock/",
        "JUPYTERHUB_API_TOKEN": "test-token",
        "JUPYTERHUB_API_URL": "http://127.0.0.1:9/hub/api",
        "JUPYTERHUB_CLIENT_ID": "service-airlock",
        "JUPYTERHUB_SERVICE_NAME": "airlock",
        "JUPYTERHUB_OAUTH_CALLBACK_URL": "/services/airlock/oauth_callback",
    }
    if not hub_env:
        env = {k: v for k, v in env.items() if not k.startswith("JUPYTERHUB_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "paitient.cli",
            "service",
            "airlock",
            f"--site={site_file}",
            f"--state-dir={state}",
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not hub_env and (state / "run" / "airlock.sock").exists():
            return proc
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/services/airlock/api/requests", timeout=1)  # noqa: S310
        except urllib.error.HTTPError:
            if (state / "run" / "airlock.sock").exists():
                return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode())
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the airlock service did not come up within 30 s")


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=30)


@pytest.mark.e2e
def test_the_service_process_restarts_with_every_request_and_decision(world_tmp, make_system_user):
    from paitient.registry import Registry
    from paitient.services.kit.process import free_port

    state = world_tmp / "state"
    state.mkdir(mode=0o755)
    site_file = world_tmp / "site.toml"
    site_file.write_text(SITE_TOML.format(state=state))
    alice = make_system_user("alice")
    register(Registry.for_state_dir(state), "alice", alice.pw_uid, projects=["oncology"])
    port = free_port()
    proc = _start(site_file, state, port)
    try:
        path = give(Path(alice.pw_dir) / "t.csv", b"stage,n\nI,120\nII,48\n", alice.pw_uid)
        code = f"""
            import json, time
            from paitient import airlock
            rid = airlock.request({str(path)!r}, kind="table", justification="table 1", confirm=True)
            while airlock.status(rid)["state"] != "in_review":
                time.sleep(0.1)
            print(json.dumps(airlock.status(rid)))
        """
        first = run_as(alice.pw_uid, code, state / "run", cwd=path.parent)
        assert first.returncode == 0, first.stderr
        rid = json.loads(first.stdout.splitlines()[-1])["id"]
        # a steward's decision, written to the same store by another process
        Store(state / "airlock").decide(
            rid, reviewer="sam", action="approve", comment="counts above 10", may_review=True, approvals_needed=1
        )
    finally:
        assert _stop(proc) == 0
    assert not (state / "run" / "airlock.sock").exists()

    proc = _start(site_file, state, port)
    try:
        code = f"""
            import json
            from paitient import airlock
            print(json.dumps(airlock.status({rid!r})))
        """
        again = run_as(alice.pw_uid, code, state / "run")
        assert again.returncode == 0, again.stderr
        after = json.loads(again.stdout.splitlines()[-1])
        assert after["state"] == "released"
        assert [(d["by"], d["action"], d["comment"]) for d in after["decisions"]] == [
            ("sam", "approve", "counts above 10")
        ]
        assert {c["check"]: c["status"] for c in after["checks"]} == {
            "published_copy": "pass",
            "row_level": "pass",
            "labels": "pass",  # "stage", "I" and "II" are the project's table_labels of the site file
            "row_content": "pass",
            "minimum_count": "pass",
            "zeros": "pass",
            "dominance": "pass",
            "canonical": "pass",  # stored as the CSV re-written from its cells
            "differencing": "pass",
        }
        # The pages answer behind the hub's login.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/services/airlock/")
        page = conn.getresponse()
        assert page.status == 302
        assert "/hub/api/oauth2/authorize?" in page.getheader("Location")
        assert "client_id=service-airlock" in page.getheader("Location")
        conn.close()
    finally:
        assert _stop(proc) == 0


@pytest.mark.e2e
def test_by_hand_without_a_hub_socket_and_checks_run_with_command_line_settings(world_tmp, make_system_user):
    from paitient.registry import Registry
    from paitient.services.kit.process import free_port

    state = world_tmp / "state"
    state.mkdir(mode=0o755)
    site_file = world_tmp / "site.toml"
    site_file.write_text(SITE_TOML.format(state=state))
    alice = make_system_user("alice")
    register(Registry.for_state_dir(state), "alice", alice.pw_uid, projects=["oncology"])
    port = free_port()
    # Run by hand, without a hub: the socket and the checks only; a rule comes from --AirlockSettings.
    proc = _start(site_file, state, port, "--AirlockSettings.min_count=5", hub_env=False)
    try:
        path = give(Path(alice.pw_dir) / "t.csv", b"stage,n\nI,120\nII,7\n", alice.pw_uid)
        code = f"""
            import json, time
            from paitient import airlock
            rid = airlock.request({str(path)!r}, kind="table", justification="table 1", confirm=True)
            while airlock.status(rid)["state"] != "in_review":
                time.sleep(0.1)
            print(json.dumps(airlock.status(rid)))
        """
        out = run_as(alice.pw_uid, code, state / "run", cwd=path.parent)
        assert out.returncode == 0, out.stderr
        checks = {c["check"]: c for c in json.loads(out.stdout.splitlines()[-1])["checks"]}
        assert checks["minimum_count"]["status"] == "pass" and checks["minimum_count"]["details"]["threshold"] == 5
        with pytest.raises(ConnectionRefusedError):  # no pages without the hub's OAuth
            http.client.HTTPConnection("127.0.0.1", port, timeout=5).request("GET", "/services/airlock/")
    finally:
        assert _stop(proc) == 0


SLOW_MODEL = """
import time
import torch
class Model(torch.nn.Module):
    def __init__(self, d=30):
        super().__init__()
        time.sleep(6)
        self.lin = torch.nn.Linear(d, 2)
    def forward(self, x):
        return self.lin(x)
"""


@pytest.mark.e2e
def test_a_crash_mid_check_is_checked_again_and_leaves_no_data_behind(world_tmp, make_system_user, request):
    from safetensors.torch import save

    from paitient.registry import Registry
    from paitient.services.kit.process import free_port
    from tests.airlock.helpers import breast_cancer, publish
    from tests.ledger.conftest import start_service_process

    state = world_tmp / "state"
    state.mkdir(mode=0o755)
    site_file = world_tmp / "site.toml"
    site_file.write_text(SITE_TOML.format(state=state))
    publish(load(site_file), "oncology", "breast_cancer", breast_cancer())
    alice = make_system_user("alice")
    register(Registry.for_state_dir(state), "alice", alice.pw_uid, projects=["oncology"])
    ns: dict = {}
    exec(SLOW_MODEL, ns)  # noqa: S102 - the test's own model
    weights = give(Path(alice.pw_dir) / "m.safetensors", save(ns["Model"]().state_dict()), alice.pw_uid)
    # The weights check asks the privacy ledger over its socket: run it as the hub would, for the whole test.
    ledger = start_service_process(load(site_file), log_path=world_tmp / "ledger.log")
    request.addfinalizer(lambda: (ledger.send_signal(signal.SIGTERM), ledger.wait(timeout=30)))
    port = free_port()
    proc = _start(site_file, state, port)
    store = Store(state / "airlock")
    try:
        code = f"""
            import json
            from paitient import airlock
            print(json.dumps(airlock.request({str(weights)!r}, kind="weights", justification="model", confirm=True,
                  model_source={SLOW_MODEL!r}, target="target", dataset="breast_cancer",
                  split={{"holdout": 0.3, "seed": 0}})))
        """
        out = run_as(alice.pw_uid, code, state / "run", cwd=weights.parent)
        assert out.returncode == 0, out.stderr
        rid = json.loads(out.stdout.splitlines()[-1])
        deadline = time.monotonic() + 30
        scratch = state / "airlock-audit"
        while not subprocess.run(["pgrep", "-f", f"{scratch}/.*worker.py"], capture_output=True).stdout:
            assert time.monotonic() < deadline, store.get(rid).state  # wait for the sandboxed worker
            time.sleep(0.1)
        time.sleep(1)  # now inside the model's constructor
    finally:
        proc.kill()  # SIGKILL: no cleanup of any kind
        proc.wait(timeout=30)
    assert store.get(rid).state == "checking"
    (left,) = [p.parent.parent for p in scratch.glob("*/job/x.npy")]  # the crash left dataset rows
    time.sleep(1)
    left_pids = subprocess.run(["pgrep", "-f", str(scratch)], capture_output=True, text=True).stdout.split()
    assert left_pids == [], subprocess.run(
        ["ps", "-o", "pid,ppid,stat,etime,cmd", "-p", ",".join(left_pids)], capture_output=True, text=True
    ).stdout  # the sandbox died too

    proc = _start(site_file, state, port)
    try:
        assert not left.exists()  # removed at start, before any new audit
        deadline = time.monotonic() + 120
        while store.get(rid).state != "in_review":
            assert time.monotonic() < deadline, store.get(rid).state
            time.sleep(0.2)
    finally:
        assert _stop(proc) == 0
    reruns = [e.data["rerun"] for e in store.events(rid, "state") if e.data["to"] == "checking"]
    assert reruns == [False, True]
    checks = {c["check"]: c["status"] for c in store.checks(rid)}
    assert checks["membership_inference"] == "pass" and checks["training_record"] == "fail"
    assert not any(scratch.iterdir())
