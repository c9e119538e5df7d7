"""A real workspace: the operator's metrics token reads the hub's and every service's metrics, researchers and
stewards are refused, and the hub's idle culler stops a server nobody uses, its kernel with it."""

from __future__ import annotations

import os
import pwd
import subprocess
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from paitient.hub.paths import HubPaths
from paitient.ops.up import Running, hub_api
from tests.e2e.workspace import own_workspace

pytestmark = pytest.mark.e2e

CULL_TIMEOUT = 60  # the least the site allows; the culler looks every 15 s
# The server's own idle timers are off: whatever stops the server here is the hub's culler. It may stop the
# server any time after the cell: the metrics checks below need only what the services counted.
IDLE_SITE = f"\n[server]\nidle_timeout = 0\ncull_timeout = {CULL_TIMEOUT}\n"
SERVICES_WITH_METRICS = ("egress", "ledger", "airlock", "jobs", "audit")


def sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise AssertionError(f"no sample {name}{labels} in:\n{text[:2000]}")


def processes_of(uid: int) -> list[str]:
    out = subprocess.run(["ps", "-o", "pid=,args=", "-u", str(uid)], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def test_metrics_for_the_operator_only_and_an_idle_server_is_stopped_with_its_kernel():
    with own_workspace("paitient-e2e-idle-", "ptv", extra_site=IDLE_SITE) as ws:
        running = Running.read(HubPaths(ws.state_dir).up_file)
        base = f"http://127.0.0.1:{running.hub_port}/"
        operator = (ws.state_dir / "hub" / "operator_token").read_text().strip()
        metrics_token = (ws.state_dir / "hub" / "metrics_token").read_text().strip()
        bearer = {"Authorization": f"Bearer {metrics_token}"}

        alice = ws.login("alice")
        ws.start_server(alice, "alice")
        kernel = ws.start_kernel(alice, "alice")
        cell = ws.run_cell(alice, "alice", "print(6 * 7)", kernel)
        assert cell.error is None and cell.stdout.strip() == "42", cell
        member = ws.member("alice")
        assert processes_of(member.uid), "alice's server and kernel run as her account"
        assert hub_api(base, operator, "/users/alice")["servers"], "alice's server runs"

        # -- metrics: the operator's token reads them all, aggregates only ---------------------------------
        hub = requests.get(ws.url + "hub/metrics", headers=bearer, timeout=30)
        assert hub.status_code == 200 and sample(hub.text, "jupyterhub_running_servers") >= 1
        assert sample(hub.text, "paitient_hub_records_waiting") == 0  # the trail took every record of the hub
        for name in SERVICES_WITH_METRICS:
            r = requests.get(ws.url + f"services/{name}/metrics", headers=bearer, timeout=30)
            assert r.status_code == 200 and f"paitient_{name}" in r.text, (name, r.status_code, r.text[:500])
            assert "alice" not in r.text, name
            if name == "egress":  # the cell's output went through the gate
                assert sample(r.text, "paitient_egress_bytes_total", channel="kernel") > 0
            # alice's browser session is refused, and so is anyone without a token
            assert alice.get(ws.url + f"services/{name}/metrics", allow_redirects=False, timeout=30).status_code == 403
            assert requests.get(ws.url + f"services/{name}/metrics", timeout=30).status_code == 403
        assert alice.get(ws.url + "hub/metrics", timeout=30).status_code == 403
        assert requests.get(ws.url + "hub/metrics", timeout=30).status_code == 403
        # a steward signed in to the ledger's page, with its cookie: the page yes, the metrics no
        sam = ws.login("sam")
        assert sam.get(ws.url + "services/ledger/", timeout=60).status_code == 200
        assert sam.get(ws.url + "services/ledger/metrics", allow_redirects=False, timeout=30).status_code == 403
        assert sam.get(ws.url + "hub/metrics", timeout=30).status_code == 403

        # -- idle: nobody uses alice's server; the culler stops it ----------------------------------------
        deadline = time.monotonic() + CULL_TIMEOUT + 120
        while hub_api(base, operator, "/users/alice")["servers"]:
            assert time.monotonic() < deadline, "the idle server was not stopped" + ws.logs()
            time.sleep(2)
        # its kernel ended with it: nothing runs as alice's account any more
        deadline = time.monotonic() + 30
        while processes_of(member.uid):
            assert time.monotonic() < deadline, processes_of(member.uid)
            time.sleep(0.5)
        # the culler did it (its log goes to the hub's), not the server itself or paitient
        hub_log = (ws.state_dir / "logs" / "hub.log").read_text(errors="replace")
        assert "Culling server alice (inactive for" in hub_log, ws.logs()
        # the account and the home stay; the next visit starts the server again
        assert os.path.isdir(pwd.getpwnam(member.account).pw_dir)
        ws.start_server(alice, "alice")
        again = ws.run_cell(alice, "alice", "print('back')")
        assert again.stdout.strip() == "back", again
