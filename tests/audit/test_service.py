"""The audit service: the sender is who its uid says, forged actions are refused, sizes are capped."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from paitient.registry import Member, Registry
from paitient.server import audit as client
from paitient.services.audit.service import custom_scopes, hub_service
from paitient.services.audit.verify import verify_dir
from paitient.services.audit.writer import trail_files
from tests import workspacegroup
from tests.trail import trail_records


@pytest.fixture
def service(site):
    """`paitient service audit` as a real root process on the site's state dir; stopped by its pid."""
    sock = site.run_dir / "audit.sock"
    # nobody stands in for a signed-in researcher: only the workspace's accounts are served
    Registry.for_state_dir(site.state_dir).put(
        Member(username="alice", account="nobody", uid=65534, projects=("demo",))
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "paitient.cli", "service", "audit", f"--state-dir={site.state_dir}"],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "audit service did not start"
        time.sleep(0.05)
    yield proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def as_nobody(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", workspacegroup.setpriv_groups(), sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )


def send_as_nobody(site, **kwargs) -> subprocess.CompletedProcess:
    code = (
        "import json, os; from paitient.server.audit import send; from paitient.services.audit import AuditError\n"
        "try:\n"
        f"    print(json.dumps(send({str(site.run_dir)!r}, **{kwargs!r})))\n"
        "except AuditError as e:\n"
        "    print('REFUSED', e.code, e)\n"
        "print('PID', os.getpid())\n"
    )
    return as_nobody(code)


def test_sender_is_identified_by_peer_credentials(site, service):
    Registry.for_state_dir(site.state_dir).put(
        Member(username="alice", account="nobody", uid=65534, projects=("demo",))
    )
    out = send_as_nobody(site, action="cell.execute", object="kernel-1", details={"code": "1 + 1"})
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split("PID ")[1])
    rec = trail_records(site)[-1]
    assert rec["actor"] == "alice" and rec["action"] == "cell.execute" and rec["object"] == "kernel-1"
    assert rec["details"]["code"] == "1 + 1"
    assert rec["details"]["peer"] == {"pid": pid, "uid": 65534, "origin": "host"}


def test_records_sent_from_inside_a_pid_namespace_are_marked(site, service):
    # A sandboxed kernel has its own pid namespace; it shares the uid with the user's server, but the
    # service can tell them apart and says so in the record.
    code = f"from paitient.server.audit import send; send({str(site.run_dir)!r}, action='kernel.stop', object='k9')"
    out = subprocess.run(
        [
            "unshare",
            "--pid",
            "--fork",
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            workspacegroup.setpriv_groups(),
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rec = trail_records(site)[-1]
    assert rec["object"] == "k9" and rec["details"]["peer"]["origin"] == "namespaced"
    assert rec["details"]["peer"]["uid"] == 65534


def test_an_unknown_uid_is_refused_not_recorded_as_an_event(site, service):
    code = (
        "from paitient.server.audit import send; from paitient.services.audit import AuditError\n"
        "try:\n"
        f"    send({str(site.run_dir)!r}, action='kernel.start')\n"
        "except AuditError as e:\n"
        "    print('REFUSED', e.code)\n"
    )
    out = subprocess.run(
        ["setpriv", "--reuid=65533", "--regid=65534", workspacegroup.setpriv_groups(), sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip() == "REFUSED unknown_caller", out.stdout + out.stderr
    rec = trail_records(site)[-1]
    assert rec["action"] == "channel.refused" and rec["actor"] == "uid:65533" and rec["object"] == "audit"
    assert not [r for r in trail_records(site) if r["action"] == "kernel.start"]


@pytest.mark.parametrize(
    "action",
    [
        "airlock.decision",
        "airlock.request",
        "auth.login",
        "ledger.settle",
        "audit.recovered",
        "audit.file",
        "config.effective",
    ],
)
def test_forged_actions_are_refused(site, service, action):
    before = len(trail_records(site))
    out = send_as_nobody(site, action=action, object="r1", outcome="ok")
    assert "REFUSED forbidden" in out.stdout and "may not be reported from a user's server" in out.stdout
    assert len(trail_records(site)) == before


def test_the_actor_cannot_be_claimed(site, service):
    code = (
        "from paitient.channel import call, ChannelError\n"
        "try:\n"
        f"    call({str(site.run_dir / 'audit.sock')!r}, 'record', "
        "{'action': 'cell.execute', 'actor': 'bob', 'details': {}})\n"
        "except ChannelError as e:\n"
        "    print(e.code, e)\n"
    )
    out = as_nobody(code)
    assert out.stdout.startswith("bad_request unknown field(s) actor")
    assert all(r["actor"] != "bob" for r in trail_records(site))


@pytest.mark.parametrize(
    "event",
    [
        {"object": "cardiometabolic/diabetes"},
        {"details": {"project": "cardiometabolic"}},
        {"details": {"projects": ["oncology", "cardiometabolic"]}},
        {"details": {"datasets": ["cardiometabolic/diabetes"]}},
    ],
)
def test_events_cannot_name_another_project(site, service, event):
    # `audit show --project` lists what names a project: a kernel may name only its user's own projects
    Registry.for_state_dir(site.state_dir).put(
        Member(username="alice", account="nobody", uid=65534, projects=("oncology",))
    )
    before = len(trail_records(site))
    out = send_as_nobody(site, action="kernel.start", **event)
    assert "REFUSED forbidden" in out.stdout and "cardiometabolic" in out.stdout, out
    assert len(trail_records(site)) == before
    ok = send_as_nobody(
        site,
        action="kernel.start",
        object="oncology/breast_cancer",
        details={"project": "oncology", "datasets": ["oncology/breast_cancer"]},
    )
    assert "REFUSED" not in ok.stdout and trail_records(site)[-1]["details"]["project"] == "oncology"


def test_users_cannot_touch_the_trail_files(site, service):
    send_as_nobody(site, action="kernel.stop")
    ((_, path),) = trail_files(site.state_dir / "audit")
    code = (
        f"import os\nfor p, m in (({str(path)!r}, 'ab'), ({str(path)!r}, 'rb'), "
        f"({str(site.state_dir / 'audit' / 'x')!r}, 'wb')):\n"
        "    try:\n        open(p, m)\n        print('OPENED', p, m)\n"
        "    except PermissionError:\n        print('denied')\n"
    )
    out = as_nobody(code)
    assert out.stdout.split() == ["denied"] * 3, out.stdout


def test_huge_cell_is_recorded_cut_with_length_and_digest(site, service):
    code = "x = 1\n" * 200_000  # 1.2 MB: more than one request may carry
    rec_ok = client.send(site.run_dir, action="cell.execute", object="k", details={"code": code})
    rec = trail_records(site)[-1]
    assert rec["seq"] == rec_ok["seq"] and rec["hash"] == rec_ok["hash"]
    assert len(rec["details"]["code"]) == site.audit.user_string_chars
    assert code.startswith(rec["details"]["code"])
    # the client cut it to fit one request; the record describes the whole cell the user ran
    assert rec["details"]["code_truncated"] == {
        "length": len(code),
        "sha256": hashlib.sha256(code.encode()).hexdigest(),
    }


def test_service_computes_the_digest_of_what_it_cut(site, service):
    code = "y = 2\n" * 20_000  # 120 kB: fits one request, longer than the service keeps
    client.send(site.run_dir, action="cell.execute", object="k", details={"code": code})
    rec = trail_records(site)[-1]
    assert rec["details"]["code"] == code[: site.audit.user_string_chars]
    assert rec["details"]["code_truncated"] == {
        "length": len(code),
        "sha256": hashlib.sha256(code.encode()).hexdigest(),
    }


def test_service_stops_cleanly_and_the_chain_holds(site, service):
    for i in range(5):
        client.send(site.run_dir, action="cell.execute", details={"i": i})
    service.send_signal(signal.SIGTERM)
    assert service.wait(20) == 0
    assert not (site.run_dir / "audit.sock").exists()
    report = verify_dir(site.state_dir / "audit")
    assert report.ok and report.records == 8  # header, audit.start, 5 cells, audit.stop
    assert trail_records(site)[-1]["action"] == "audit.stop"


def test_hub_service_entry(site):
    entry = hub_service(site, "/opt/paitient/venv/bin/python", port=18123)
    assert entry["name"] == "audit" and entry["url"] == "http://127.0.0.1:18123"
    assert entry["command"] == [
        "/opt/paitient/venv/bin/python",
        "-m",
        "paitient.cli",
        "service",
        "audit",
        f"--state-dir={site.state_dir}",
    ]
    assert entry["oauth_client_allowed_scopes"] == ["custom:audit:read"]
    assert "custom:audit:read" in custom_scopes()
    assert os.path.basename(entry["command"][0]) == "python"


def test_service_serves_the_web_view_behind_hub_login(site):
    import requests

    from paitient.services.kit.process import free_port

    port = free_port()
    env = {
        **os.environ,
        "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{port}",
        "JUPYTERHUB_SERVICE_PREFIX": "/services/audit/",
        "JUPYTERHUB_API_TOKEN": "test-token",
        "JUPYTERHUB_API_URL": "http://127.0.0.1:1/hub/api",
        "JUPYTERHUB_CLIENT_ID": "service-audit",
        "JUPYTERHUB_OAUTH_CALLBACK_URL": "/services/audit/oauth_callback",
        "JUPYTERHUB_BASE_URL": "/",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "paitient.cli", "service", "audit", f"--state-dir={site.state_dir}"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                r = requests.get(f"http://127.0.0.1:{port}/services/audit/", allow_redirects=False, timeout=5)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "web view did not start"
                time.sleep(0.1)
        assert r.status_code == 302
        assert r.headers["Location"].startswith("/hub/api/oauth2/authorize?")
        assert "client_id=service-audit" in r.headers["Location"]
        api = requests.get(f"http://127.0.0.1:{port}/services/audit/api/records", timeout=5)
        assert api.status_code == 403 and api.json()["status"] == 403
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_service_refuses_to_start_on_a_directory_users_may_write(site):
    audit = site.state_dir / "audit"
    audit.mkdir(parents=True)
    os.chmod(audit, 0o777)
    out = subprocess.run(
        [sys.executable, "-m", "paitient.cli", "service", "audit", f"--state-dir={site.state_dir}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "group or others may write to it (mode 777); run: chmod 750" in out.stderr
    assert "Traceback" not in out.stderr and not (site.run_dir / "audit.sock").exists()
