"""The services each in a process of their own, as the systemd units of `paitient install` run them.

`paitient up --separate-services` starts every root-side service with the command its unit runs
(:func:`paitient.ops.commands.service_command`) and the hub told their ports: the hub starts none of them.
A researcher's day and a steward's review then work as under the hub: a cell in a sandboxed kernel (the
launcher), its output judged (egress) and recorded (audit), a request filed and decided on the airlock's
pages (signed in through the hub's OAuth with the token the service shares with the hub), the ledger's page.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from paitient.config import load
from paitient.hub.paths import HubPaths
from paitient.ops.up import Running
from paitient.services import SERVICES
from paitient.services.kit.process import SEPARATE_PORTS
from tests.e2e.test_audit_events import REQUEST, cell_json, decide, event, last_seq, signed_in, wait_for
from tests.e2e.workspace import Workspace, own_workspace

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ws():
    with own_workspace("pts-", "pts", up_args=("--separate-services",)) as workspace:
        yield workspace


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_each_service_is_a_process_of_its_own_not_a_child_of_the_hub(ws: Workspace):
    running = Running.read(HubPaths.of(load(str(ws.site_file))).up_file)
    assert running is not None
    for name in SERVICES:
        pid = running.pids[f"service-{name}"]
        argv = _cmdline(pid)
        assert argv[argv.index("service") + 1] == name and "--separate" in argv, argv
        assert _ppid(pid) == running.up_pid != running.pids["hub"]
        # a service with pages (or metrics) knows its port, the hub's and its token file, not the token itself
        token = (ws.state_dir / "hub" / f"service_{name}_token").read_text().strip()
        assert token not in " ".join(argv)
        assert any(a.startswith("--port=") for a in argv) == (name in SEPARATE_PORTS)
    hub = _cmdline(running.pids["hub"])
    ports = next(a for a in hub if a.startswith("--separate-services=")).split("=", 1)[1]
    assert sorted(item.split(":")[0] for item in ports.split(",")) == sorted(SEPARATE_PORTS)


def test_a_researchers_cell_and_a_stewards_review_work_with_the_services_apart(ws: Workspace):
    alice = signed_in(ws, "alice")
    kernel = ws.start_kernel(alice, "alice")
    mark = last_seq(ws)
    got = cell_json(ws, alice, "alice", REQUEST, kernel)
    assert got["state"] == "in_review", got
    wait_for(ws, mark, event("cell.execute", "alice"))  # the audit service recorded the cell
    wait_for(ws, mark, event("airlock.request", "alice", got["id"]))

    sam = ws.login("sam")
    ledger = sam.get(ws.url + "services/ledger/", timeout=30)
    assert ledger.status_code == 200 and "oncology" in ledger.text, ledger.text[-400:]
    assert decide(ws, sam, got["id"], "approve", "aggregate of 569 rows, groups large enough").status_code == 200
    approved = wait_for(ws, mark, event("airlock.decision", "sam", got["id"]))
    assert approved["details"]["state"] == "released"
    r = alice.get(ws.url + f"services/airlock/requests/{got['id']}/download", timeout=30)
    assert r.status_code == 200 and r.content.startswith(b"age,mean radius\n")
