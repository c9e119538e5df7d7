"""A real user server as a real account, with the real audit service: what it records, what it refuses."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paitient.registry import Registry
from tests.server.harness import UserServer, make_site, publish
from tests.trail import trail_records


@pytest.fixture
def site(world_tmp):
    s = make_site(world_tmp, {"onc": ["bc", "gbsg"], "card": ["dia"]})
    publish(s, "onc", "bc", "a\n1\n")
    publish(s, "card", "dia", "b\n2\n")
    return s


@pytest.fixture
def audit_service(site):
    """`paitient service audit` as a real root process on the site's state dir; stopped by its pid."""
    sock = site.run_dir / "audit.sock"
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
    proc.send_signal(signal.SIGTERM)
    proc.wait(20)


def wait_for(fn, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    return fn()


def test_kernel_lifecycle_and_executed_code_land_in_the_audit_trail(site, world_tmp, make_system_user, audit_service):
    user = make_system_user("audited")
    server = UserServer(site, user, ("onc",), world_tmp)
    Registry.for_state_dir(site.state_dir).put(server.member)
    with server:
        kid = server.start_kernel()
        res = server.run("print(sorted(__import__('os').listdir('/data/onc')))", kid)
        assert res.stdout.strip() == "['bc']"  # gbsg is listed in the site but not published
        assert server.request("DELETE", f"/api/kernels/{kid}").status_code == 204
        started = wait_for(lambda: trail_records(site, action="kernel.start"))
        executed = wait_for(lambda: trail_records(site, action="cell.execute"))
        stopped = wait_for(lambda: trail_records(site, action="kernel.stop"))
    assert [r["object"] for r in started] == [kid]
    assert started[0]["actor"] == user.pw_name and started[0]["details"]["datasets"] == ["onc/bc"]
    assert [r["details"]["code"] for r in executed] == ["print(sorted(__import__('os').listdir('/data/onc')))"]
    assert executed[0]["object"] == kid and executed[0]["actor"] == user.pw_name
    assert [r["object"] for r in stopped] == [kid] and stopped[0]["details"]["datasets"] == ["onc/bc"]


def test_a_kernels_activity_leaves_the_server_to_the_minute(site, world_tmp, make_system_user, audit_service):
    """The kernel chooses when it prints: the kernels API (and what the server reports to the hub) give that
    time to the minute, not to the microsecond."""
    from datetime import UTC, datetime

    from paitient.server.kernels import SandboxMappingKernelManager

    user = make_system_user("timed")
    server = UserServer(site, user, ("onc",), world_tmp)
    Registry.for_state_dir(site.state_dir).put(server.member)
    with server:
        kid = server.start_kernel()
        before = datetime.now(UTC)
        assert server.run("import time; time.sleep(0.137); print('signal')", kid).stdout.strip() == "signal"
        models = [server.get(f"/api/kernels/{kid}").json(), *server.get("/api/kernels").json()]
    times = [datetime.fromisoformat(m["last_activity"].replace("Z", "+00:00")) for m in models]
    assert all((t.second, t.microsecond) == (0, 0) for t in times), times
    assert all(before.replace(second=0, microsecond=0) <= t <= datetime.now(UTC) for t in times), times
    # The server's own latest kernel activity, which it reports to the hub, is kept the same way.
    manager = SandboxMappingKernelManager()
    manager.last_kernel_activity = datetime(2026, 12, 6, 6, 40, 17, 123456, tzinfo=UTC)
    assert manager.last_kernel_activity == datetime(2026, 12, 6, 6, 40, tzinfo=UTC)


def test_code_in_user_expressions_is_audited_before_it_runs(site, world_tmp, make_system_user, audit_service):
    """Attack: an execute_request whose cell is empty and whose code is in ``user_expressions``, which IPython
    evaluates after the cell in the user's namespace. It runs (the file it writes appears) only with its text
    in the execution's audit record."""
    user = make_system_user("userexpr")
    marker = Path(user.pw_dir) / "expression-ran.txt"
    expression = f"open({str(marker)!r}, 'w').write('evaluated')"
    server = UserServer(site, user, ("onc",), world_tmp)
    Registry.for_state_dir(site.state_dir).put(server.member)
    with server:
        kid = server.start_kernel()
        res = server.run("", kid, user_expressions={"probe": expression})
        assert res.reply is not None and res.reply["status"] == "ok", res.reply
        assert res.reply["user_expressions"]["probe"]["status"] == "ok", res.reply["user_expressions"]
        assert marker.read_text() == "evaluated"
        executed = wait_for(lambda: [r for r in trail_records(site, action="cell.execute") if r["object"] == kid])
    assert len(executed) == 1 and executed[0]["actor"] == user.pw_name
    details = executed[0]["details"]
    assert details["code"] == "" and details["user_expressions"] == {"probe": expression}
    assert details["truncated"] is False


def test_a_server_whose_config_lost_the_lockdown_refuses_to_start(site, world_tmp, make_system_user):
    user = make_system_user("open")
    server = UserServer(site, user, ("onc",), world_tmp, extra_args=("--ServerApp.terminals_enabled=True",))
    with pytest.raises(RuntimeError, match="not locked down: terminals are enabled"):
        server.start(timeout=60)


def test_a_cell_is_refused_while_the_audit_service_is_stopped_and_runs_once_it_is_back(
    site, world_tmp, make_system_user
):
    """Attack: run a cell while the audit service is stopped. The kernel starts (its start is logged as
    unrecorded), the cell never reaches it (its side effect does not happen) and the browser gets an error
    reply saying auditing is down; once the service is back the same kernel runs the next cell, recorded."""
    from tests.server.harness import audit_service

    user = make_system_user("noaudit")
    marker = Path(user.pw_dir) / "ran.txt"
    code = f"open({str(marker)!r}, 'w').write('ran'); print('ran')"
    with UserServer(site, user, ("onc",), world_tmp, start_audit=False) as server:
        kernel = server.start_kernel()
        refused = server.run(code, kernel)
        assert refused.error is not None and refused.error.startswith("AuditUnavailable: This cell was not run")
        assert "tell the workspace operator that auditing is down" in refused.error
        assert refused.reply is not None and refused.reply["status"] == "error"
        assert refused.reply["ename"] == "AuditUnavailable"
        assert refused.stdout == "" and not marker.exists()
        # the binary protocol JupyterLab speaks, and the control channel, are refused the same way
        assert server.run(code, kernel, v1=True).error.startswith("AuditUnavailable")
        assert server.run(code, kernel, channel="control").error.startswith("AuditUnavailable")
        # nor does an empty cell carrying its code in user_expressions run
        hidden = server.run("", kernel, user_expressions={"x": code})
        assert hidden.error is not None and hidden.error.startswith("AuditUnavailable")
        assert not marker.exists()
        with audit_service(site):
            ran = server.run(code, kernel)
            assert ran.error is None and ran.stdout == "ran\n" and marker.read_text() == "ran"
            assert ran.reply is not None and ran.reply["status"] == "ok"
        logs = server.logs()
    assert "could not record kernel.start" in logs and "it could not be audited" in logs
    executed = [r for r in trail_records(site, action="cell.execute") if r["object"] == kernel]
    assert [r["details"]["code"] for r in executed] == [code]
    assert executed[0]["actor"] == user.pw_name


def test_interrupt_reaches_the_kernel_and_keeps_the_sandbox(site, world_tmp, make_system_user):
    import threading

    user = make_system_user("interrupt")
    with UserServer(site, user, ("onc",), world_tmp) as server:
        kid = server.start_kernel()
        assert server.run("x = 41", kid).error is None
        before = server.lasting_kernel_pids()
        timer = threading.Timer(2.0, lambda: server.request("POST", f"/api/kernels/{kid}/interrupt"))
        timer.start()
        t0 = time.monotonic()
        res = server.run("import time; time.sleep(60)", kid, timeout=50)
        timer.join()
        assert res.error is not None and res.error.startswith("KeyboardInterrupt"), res
        assert time.monotonic() - t0 < 30
        assert server.run("print(x + 1)", kid).stdout == "42\n"  # same kernel, state kept
        assert server.lasting_kernel_pids() == before


def test_restarted_kernel_is_sandboxed_again(site, world_tmp, make_system_user):
    user = make_system_user("restart")
    with UserServer(site, user, ("onc",), world_tmp) as server:
        kid = server.start_kernel()
        assert server.run("x = 1", kid).error is None
        assert server.request("POST", f"/api/kernels/{kid}/restart").status_code == 200
        res = server.run(
            "import os, socket\nprint('x' in globals(), os.listdir('/data'))\n"
            "print(socket.if_nameindex(), open('/proc/net/route').read().splitlines()[1:])",
            kid,
        )
        assert res.stdout.split("\n")[:2] == ["False ['onc']", "[(1, 'lo')] []"], res


def test_kernels_die_with_a_killed_server(site, world_tmp, make_system_user):
    user = make_system_user("orphan")
    server = UserServer(site, user, ("onc",), world_tmp).start()
    try:
        server.run("print(1)", server.start_kernel())
        kernels = server.kernel_pids()
        assert len(kernels) >= 3  # prlimit->bwrap, bwrap's init, the kernel
        server.proc.kill()  # no clean shutdown: the server cannot stop its kernels
        server.proc.wait(10)
        deadline = time.monotonic() + 30  # a loaded machine: the kernels die at once, reaping them may lag
        while any(_alive(p) for p in kernels) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in kernels)
    finally:
        server.stop()


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_jupyterlab_protocol_and_control_channel_are_audited_and_capped(
    site, world_tmp, make_system_user, audit_service
):
    # JupyterLab speaks the binary v1 websocket protocol; ipykernel also executes code sent on control.
    user = make_system_user("v1")
    server = UserServer(site, user, ("onc",), world_tmp)
    Registry.for_state_dir(site.state_dir).put(server.member)
    with server:
        kid = server.start_kernel()
        res = server.run("print('v' * 3_000_000)", kid, v1=True)
        assert "exceeded 1,000,000 bytes" in res.stdout and res.wire_bytes < 600_000, res.wire_bytes
        # (output of a control-channel execution is not tied to it by ipykernel: check its effect instead)
        ctl_v1 = "import pathlib; pathlib.Path.home().joinpath('ctl-v1').write_text('ran')"
        ctl_legacy = "import pathlib; pathlib.Path.home().joinpath('ctl-legacy').write_text('ran')"
        server.run(ctl_v1, kid, v1=True, channel="control")
        server.run(ctl_legacy, kid, channel="control")
        codes = wait_for(
            lambda: (
                [r["details"]["code"] for r in trail_records(site, action="cell.execute")]
                if len(trail_records(site, action="cell.execute")) >= 3
                else None
            )
        )
    home = Path(user.pw_dir)
    assert (home / "ctl-v1").read_text() == "ran" and (home / "ctl-legacy").read_text() == "ran"
    assert codes == ["print('v' * 3_000_000)", ctl_v1, ctl_legacy]


def test_a_researchers_notebook_round_trip_works(site, world_tmp, make_system_user):
    # Saving and opening a notebook signs and checks it (the notary writes its key); settings are saved.
    user = make_system_user("notebook")
    nb = {
        "cells": [
            {
                "cell_type": "code",
                "source": "1 + 1",
                "metadata": {},
                "execution_count": 1,
                "outputs": [
                    {"output_type": "execute_result", "data": {"text/plain": "2"}, "metadata": {}, "execution_count": 1}
                ],
            }
        ],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3 (sandbox)"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    with UserServer(site, user, ("onc",), world_tmp) as server:
        assert server.request("PUT", "/api/contents/work.ipynb", json={"type": "notebook", "content": nb}).ok
        r = server.get("/api/contents/work.ipynb?content=1")
        assert r.status_code == 200, r.text[:500]
        assert r.json()["content"]["cells"][0]["outputs"][0]["data"] == {"text/plain": "2"}
        r = server.request(
            "POST",
            "/api/sessions",
            json={"path": "work.ipynb", "type": "notebook", "name": "w", "kernel": {"name": "python3"}},
        )
        assert r.status_code == 201, r.text[:300]
        assert server.run("print(1 + 1)", r.json()["kernel"]["id"]).stdout == "2\n"
        r = server.request(
            "PUT",
            "/lab/api/settings/@jupyterlab/apputils-extension:themes",
            json={"raw": '{"theme": "JupyterLab Dark"}'},
        )
        assert r.status_code == 204, r.text[:300]
    assert (server.config_dir.parent / "state" / "notary" / "notebook_secret").stat().st_uid == user.pw_uid


@pytest.mark.e2e
def test_idle_kernels_are_culled_and_then_the_idle_server_stops(world_tmp, make_system_user):
    site = make_site(world_tmp, {"onc": ["bc"]}, server={"idle_timeout": 4})
    publish(site, "onc", "bc", "a\n1\n")
    user = make_system_user("idle")
    with UserServer(site, user, ("onc",), world_tmp) as server:
        kid = server.start_kernel()
        assert server.run("x = 1", kid).error is None
        assert server.kernel_pids()
        # culling runs every 10 s at the earliest; the kernel goes, its sandbox with it
        gone = wait_for(lambda: server.get("/api/kernels").json() == [] and not server.kernel_pids(), timeout=40)
        assert gone, server.get("/api/kernels").json()
        # with no kernel and no activity the server stops itself (the server looks once a minute)
        assert wait_for(lambda: server.proc.poll() is not None, timeout=90), server.logs()
        assert "No kernels for 4 seconds" in server.logs() or "shutting down" in server.logs().lower()


def test_a_kernel_past_the_accounts_limit_is_refused_with_what_to_do(world_tmp, make_system_user):
    """Through the kernels API as JupyterLab asks: at ``kernels_per_account = 1`` the second kernel is refused,
    and the answer's message (what Lab shows in its "Error Starting Kernel" dialog) says why and what to do.
    Ending the first frees the place."""
    site = make_site(world_tmp, {"onc": ["bc"]}, sandbox={"kernels_per_account": 1})
    publish(site, "onc", "bc", "a\n1\n")
    user = make_system_user("capped")
    with UserServer(site, user, ("onc",), world_tmp) as server:
        first = server.start_kernel()
        refused = server.request("POST", "/api/kernels", json={})
        assert refused.status_code == 403, refused.text
        message = refused.json()["message"]
        assert "already runs 1 kernel, the most one account may run" in message, message
        assert "kernels_per_account = 1" in message and "Shut Down Kernel" in message
        assert [k["id"] for k in server.get("/api/kernels").json()] == [first]
        assert server.request("DELETE", f"/api/kernels/{first}").status_code == 204
        second = wait_for(lambda: server.request("POST", "/api/kernels", json={}), timeout=20)
        deadline = time.monotonic() + 20
        while second.status_code != 201 and time.monotonic() < deadline:  # the keeper ends after the kernel
            time.sleep(0.2)
            second = server.request("POST", "/api/kernels", json={})
        assert second.status_code == 201, second.text
        assert server.run("print(1 + 1)", second.json()["id"]).stdout.strip() == "2"


def test_the_server_and_its_kernel_share_the_accounts_cpu_group(world_tmp, make_system_user):
    """With the real launcher service: once a kernel is asked for, the server that asked (whose work for the
    kernel's output is the account's) and the kernel's processes are in the account's cpu group, nothing
    else of the host is."""
    from paitient.services.launcher import cpu

    groups = cpu.find()
    assert groups is not None, "this machine's cpu control groups are not writable by root"
    site = make_site(world_tmp, {"onc": ["bc"]})
    publish(site, "onc", "bc", "a\n1\n")
    user = make_system_user("grouped")
    with UserServer(site, user, ("onc",), world_tmp) as server:
        kid = server.start_kernel()
        assert server.run("import os; print(os.getpid())", kid).stdout.strip()  # the kernel answers
        members = groups.members(user.pw_name)
        assert server.proc is not None and server.proc.pid in members
        for pid in members:  # the account's own processes, and root's pump of the kernel's output
            try:
                owner = os.stat(f"/proc/{pid}").st_uid
                argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue  # ended meanwhile
            assert owner == user.pw_uid or (owner == 0 and b"pump.py" in argv), (pid, owner, argv)
        assert len(members) >= 4  # the server, the kernel's keeper, its sandbox, the kernel
