"""Researchers' servers in containers, on the real engine: what the engine says it runs, what the server can
reach from inside its container, and the kernel, which still runs in bubblewrap on the host.

The network attacks of ``tests/attacks/test_through_hub.py`` run against a container-spawned server there as
well (its ``hub`` fixture runs each spawner); here the probe runs inside the container itself: in its mount
and network namespaces, as its user and groups, without capabilities.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

import paitient
from paitient.config import load
from paitient.hub.engine import Engine, image_tag
from paitient.hub.paths import SERVER_MODULE, HubPaths, venv_python
from paitient.ops.up import Running, hub_api
from paitient.rules.sandbox import python_roots
from paitient.services.audit.writer import trail_files
from tests.attacks.test_through_hub import Listener
from tests.e2e.workspace import own_workspace

pytestmark = pytest.mark.e2e

LOAD = "from paitient import data\ndf = data.load('breast_cancer')\n"


def status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def container_of(engine, user: str) -> dict:
    found = [c for c in engine.containers() if c["Labels"].get("org.paitient.user") == user]
    assert len(found) == 1, [c["Names"] for c in engine.containers()]
    return engine.inspect_container(found[0]["Id"])


def run_inside(container: dict, code: str, *args: str) -> str:
    """``code`` in the container's mount and network namespaces, as its user and groups, with no capability
    and no new privileges: what the server itself can do. (Entered from the host rather than through the
    engine's exec, whose helper process podman 4.3 leaves running after the exec ends.)"""
    pid = container["State"]["Pid"]
    status = status_fields(pid)
    uid, gid = status["Uid"].split()[0], status["Gid"].split()[0]
    argv = [
        "nsenter",
        f"--target={pid}",
        "--mount",
        "--net",
        "--",
        "setpriv",
        f"--reuid={uid}",
        f"--regid={gid}",
        f"--groups={','.join(status['Groups'].split()) or gid}",
        "--no-new-privs",
        "--bounding-set=-all",
        "--inh-caps=-all",
        venv_python(),
        "-I",
        "-c",
        code,
        *args,
    ]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.fixture(scope="module")
def alice(docker_ws):
    s = docker_ws.login("alice")
    docker_ws.start_server(s, "alice")
    return s


@pytest.fixture(scope="module")
def bob(docker_ws):
    s = docker_ws.login("bob")
    docker_ws.start_server(s, "bob")
    return s


@pytest.fixture(scope="module")
def alices(engine, alice) -> dict:
    return container_of(engine, "alice")


def test_up_runs_the_engine_on_storage_of_its_own_with_a_local_image(docker_ws, engine):
    running = Running.read(HubPaths.of(load(docker_ws.site_file)).up_file)
    argv = Path(f"/proc/{running.pids['engine']}/cmdline").read_bytes().decode().split("\0")
    assert argv[:1] == ["podman"] and "service" in argv
    assert argv[argv.index("--root") + 1] == str(docker_ws.state_dir / "engine" / "storage")
    image = engine.inspect_image(image_tag())
    assert image["Config"]["Labels"]["org.opencontainers.image.version"] == paitient.__version__
    # one layer of folders and links, made here: nothing pulled, no program of its own
    assert len(image["RootFS"]["Layers"]) == 1 and image["Size"] < 100_000, image["Size"]


def test_alices_server_runs_in_a_container_as_her_account_without_privileges(docker_ws, alices):
    pw = pwd.getpwnam(docker_ws.member("alice").account)
    workspace_gid = grp.getgrnam("paitient-users").gr_gid
    assert alices["Config"]["User"] == f"{pw.pw_uid}:{pw.pw_gid}"
    host = alices["HostConfig"]
    assert host["ReadonlyRootfs"] is True and host["Privileged"] is False and not host.get("CapAdd")
    assert "no-new-privileges" in host["SecurityOpt"] and host["PidMode"] == "host"
    assert host["GroupAdd"] == [str(workspace_gid)]
    status = status_fields(alices["State"]["Pid"])  # the server, seen from the host
    assert SERVER_MODULE.encode() in Path(f"/proc/{alices['State']['Pid']}/cmdline").read_bytes()
    assert status["Uid"].split() == [str(pw.pw_uid)] * 4 and status["Gid"].split() == [str(pw.pw_gid)] * 4
    assert set(status["Groups"].split()) <= {str(pw.pw_gid), str(workspace_gid)}, status["Groups"]
    assert str(workspace_gid) in status["Groups"].split()
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[caps], 16) == 0, (caps, status[caps])
    assert status["NoNewPrivs"] == "1"


def test_the_container_holds_no_data(docker_ws, alices):
    site = load(docker_ws.site_file)
    account = docker_ws.member("alice").account
    user_dir = HubPaths.of(site).user_dir(account)
    home = pwd.getpwnam(account).pw_dir
    mounts = {m["Destination"]: m for m in alices["Mounts"]}
    assert {d: m["Source"] for d, m in mounts.items() if m["Source"] != d} == {
        "/etc/passwd": str(user_dir / "etc" / "passwd"),
        "/etc/group": str(user_dir / "etc" / "group"),
    }
    expected = {
        "/usr",
        *python_roots(),
        home,
        str(site.state_dir / "gate"),
        str(site.run_dir),
        str(user_dir / "config"),
        str(user_dir / "data"),
        str(user_dir / "state"),
        "/etc/passwd",
        "/etc/group",
    }
    assert expected <= set(mounts) <= expected | {"/etc/localtime"}, sorted(mounts)
    assert {d for d, m in mounts.items() if m["RW"]} == {home, str(user_dir / "state")}
    assert not any(d.startswith(str(site.data_root)) for d in mounts)


PROBE_FILES = """
import errno, json, os, sys
def attempt(f):
    try:
        return repr(f())[:200]
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e))
data, state, hub_db = sys.argv[1:4]
print(json.dumps({
    "root": sorted(os.listdir("/")),
    "data": attempt(lambda: os.listdir(data)),
    "state": attempt(lambda: sorted(os.listdir(state))),
    "hub_db": attempt(lambda: open(hub_db, "rb").read(10)),
    "write_usr": attempt(lambda: open("/usr/x", "w")),
    "write_root": attempt(lambda: open("/x", "w")),
    "passwd": open("/etc/passwd").read().split(),
    "ids": [os.getuid(), os.getgid(), sorted(os.getgroups())],
}))
"""


def test_inside_the_container_no_dataset_and_no_state_of_the_hub_exists(docker_ws, engine, alices):
    site = load(docker_ws.site_file)
    account = docker_ws.member("alice").account
    paths = HubPaths.of(site)
    out = json.loads(
        run_inside(
            alices,
            PROBE_FILES,
            str(site.data_root),
            str(site.state_dir),
            str(paths.hub_dir / "jupyterhub.sqlite"),
        )
    )
    assert out["data"] == "ENOENT" and out["hub_db"] == "ENOENT", out
    # of the state directory only the sockets' folders and the users' folder (this user's, in part) exist
    assert out["state"] == repr(["gate", "run", "users"]), out
    assert out["write_usr"] == "EROFS" and out["write_root"] == "EROFS", out
    assert [line.split(":")[0] for line in out["passwd"]] == ["root", account]
    assert set(out["root"]) >= {"usr", "proc", "etc", "tmp"} and "data" not in out["root"], out["root"]


# What the server can reach, probed from inside its container (the probe of tests/attacks/test_through_hub.py)
SERVER_PROBE = """
import errno, json, os, socket, sys, urllib.request
targets, hub_port = json.loads(sys.argv[1]), int(sys.argv[2])
def attempt(host, port):
    try:
        socket.create_connection((host, port), timeout=5).close()
        return "open"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e))
v4 = [ln.split()[0] for ln in open("/proc/net/route").read().splitlines()[1:]]
v6 = [ln.split()[-1] for ln in open("/proc/net/ipv6_route").read().splitlines() if ln.strip()]
with urllib.request.urlopen(f"http://127.0.0.1:{hub_port}/hub/api/", timeout=10) as r:
    hub_api = [r.status, sorted(json.loads(r.read()))]
print(json.dumps({
    "netns": os.stat("/proc/self/ns/net").st_ino,
    "interfaces": [n for _, n in socket.if_nameindex()], "routes": sorted(set(v4) | set(v6)),
    "hub_api": hub_api, "targets": {name: attempt(h, p) for name, (h, p) in targets.items()},
}))
"""


def server_port(container: dict) -> int:
    env = dict(e.split("=", 1) for e in container["Config"]["Env"])
    return int(re.search(r":(\d+)/", env["JUPYTERHUB_SERVICE_URL"]).group(1))


@pytest.fixture(scope="module")
def from_alices_container(docker_ws, engine, alices, bob):
    running = Running.read(HubPaths.of(load(docker_ws.site_file)).up_file)
    listeners = [Listener("127.0.0.1", socket.AF_INET), Listener("::1", socket.AF_INET6)]
    targets = {
        "proxy": ["127.0.0.1", docker_ws.port],
        "proxy_api": ["127.0.0.1", running.proxy_api_port],
        "directory": ["127.0.0.1", int(re.search(r":(\d+)/?$", running.directory_url).group(1))],
        "bobs_server": ["127.0.0.1", server_port(container_of(engine, "bob"))],
        "host_v4": [listeners[0].host, listeners[0].port],
        "host_v6": [listeners[1].host, listeners[1].port],
        "engine_host_port": ["127.0.0.1", server_port(alices)],  # its own port, as the host sees it: inside, itself
    }
    report = json.loads(run_inside(alices, SERVER_PROBE, json.dumps(targets), str(running.hub_port)))
    yield {"report": report, "listeners": listeners}
    for listener in listeners:
        listener.sock.close()


def test_the_container_has_only_lo_in_the_namespace_its_holder_made(alices, from_alices_container):
    report = from_alices_container["report"]
    assert report["interfaces"] == ["lo"] and report["routes"] == ["lo"], report
    holder = int(alices["HostConfig"]["NetworkMode"].removeprefix("ns:/proc/").removesuffix("/ns/net"))
    assert b"servernet.py\0--hold" in Path(f"/proc/{holder}/cmdline").read_bytes()
    assert report["netns"] == os.stat(f"/proc/{holder}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
    assert os.stat(f"/proc/{alices['State']['Pid']}/ns/net").st_ino == report["netns"]


def test_the_container_reaches_the_hubs_api(from_alices_container):
    status, keys = from_alices_container["report"]["hub_api"]
    assert status == 200 and "version" in keys


@pytest.mark.parametrize("target", ["proxy", "proxy_api", "directory", "bobs_server", "host_v4", "host_v6"])
def test_the_container_reaches_no_other_loopback_service(from_alices_container, target):
    assert from_alices_container["report"]["targets"][target] == "ECONNREFUSED", from_alices_container["report"]
    assert [listener.accepted for listener in from_alices_container["listeners"]] == [0, 0]


def test_a_cell_runs_in_the_hosts_sandbox_and_its_output_passes_the_gate(docker_ws, alice):
    kernel = docker_ws.start_kernel(alice, "alice")
    res = docker_ws.run_cell(
        alice, "alice", LOAD + "import os, socket\nprint(len(df), os.listdir('/data'), socket.if_nameindex())", kernel
    )
    # /data exists in the launcher's sandbox only: the kernel runs on the host, not in the container
    assert res.error is None and res.stdout.strip() == "569 ['oncology'] [(1, 'lo')]", res
    res = docker_ws.run_cell(alice, "alice", "print(df.to_csv())", kernel)
    assert "output withheld" in res.stderr and "rows of breast_cancer" in res.stderr, res.stderr[-300:]
    assert "mean radius" not in res.stdout

    def trail() -> list[dict]:
        records = []
        for _, path in trail_files(docker_ws.state_dir / "audit"):
            records += [json.loads(line) for line in path.read_text().splitlines()]
        return records

    def withheld() -> list[dict]:
        return [r for r in trail() if r["action"] == "egress.withheld" and r["actor"] == "alice"]

    # The record names the rows of the first withheld piece of the output (how the kernel's stream is cut
    # into pieces depends on the load); the service writes it a moment after the verdict: wait for it.
    deadline = time.monotonic() + 30
    while not any(r["details"]["rows"].get("oncology/breast_cancer", 0) > 0 for r in withheld()):
        assert time.monotonic() < deadline, [r["details"] for r in withheld()]
        time.sleep(0.2)
    spawns = [r for r in trail() if r["action"] == "server.spawn" and r["actor"] == "alice"]
    assert spawns and spawns[-1]["details"]["container"] and spawns[-1]["details"]["holder"]


def _leftovers(root: Path) -> list[str]:
    """Processes whose command line names the workspace's directory, and mounts under it."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if str(root).encode() in (proc / "cmdline").read_bytes():
                    found.append(f"pid {proc.name}: {(proc / 'cmdline').read_bytes()[:200]!r}")
            except OSError:
                continue
    found += [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(root) in line]
    return found


def test_stopping_a_server_and_the_workspace_leaves_nothing_running():
    with own_workspace("ptk-stop-", "ptks", up_args=("--spawner=docker",)) as ws:
        from docker import APIClient

        engine = APIClient(base_url=Engine(ws.state_dir).url, version="auto")
        s = ws.login("alice")
        ws.start_server(s, "alice")
        first = container_of(engine, "alice")
        holder = int(first["HostConfig"]["NetworkMode"].removeprefix("ns:/proc/").removesuffix("/ns/net"))
        server = first["State"]["Pid"]
        paths = HubPaths.of(load(ws.site_file))
        running = Running.read(paths.up_file)
        # one server stopped through the hub: its container and its holder go, the workspace runs on
        hub_api(
            f"http://127.0.0.1:{running.hub_port}/", paths.secret("operator_token"), "/users/alice/server", "DELETE"
        )
        for pid in (holder, server):
            subprocess.run(["timeout", "30", "tail", f"--pid={pid}", "-f", "/dev/null"], check=True)
        assert engine.containers(all=True) == []
        ws.start_server(s, "alice")  # and again, in a new namespace
        assert container_of(engine, "alice")["HostConfig"]["NetworkMode"] != first["HostConfig"]["NetworkMode"]
        engine.close()
        ws.stop(remove_accounts=False)
        assert not Path(f"/proc/{running.pids['engine']}").exists()
        assert _leftovers(ws.root) == []


@pytest.mark.parametrize(
    ("podman", "reason"),
    [("/bin/false", "the container engine exited with code 1"), ("/nonexistent/podman", "is not installed")],
    ids=["exits", "missing"],
)
def test_an_engine_that_cannot_start_stops_up_with_its_reason(podman, reason):
    with own_workspace(
        "ptk-noengine-", "ptkn", start=False, up_args=("--spawner=docker", f"--UpCommand.podman={podman}")
    ) as ws:
        with pytest.raises(RuntimeError) as e:
            ws.start(timeout=60)
        assert "the container engine (docker spawner) cannot start" in str(e.value) and reason in str(e.value)
        assert _leftovers(ws.root) == []


def test_a_killed_hub_keeps_the_container_and_its_namespace_and_the_next_hub_stops_them():
    with own_workspace("ptk-restart-", "ptkr", up_args=("--spawner=docker",)) as ws:
        from docker import APIClient

        engine = APIClient(base_url=Engine(ws.state_dir).url, version="auto")
        s = ws.login("alice")
        ws.start_server(s, "alice")
        kernel = ws.start_kernel(s, "alice")
        assert ws.run_cell(s, "alice", "x = 41", kernel_id=kernel).error is None
        before = container_of(engine, "alice")
        holder = int(before["HostConfig"]["NetworkMode"].removeprefix("ns:/proc/").removesuffix("/ns/net"))
        paths = HubPaths.of(load(ws.site_file))
        old_hub = Running.read(paths.up_file).pids["hub"]
        os.kill(old_hub, 9)  # no chance to clean up
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            running = Running.read(paths.up_file)
            if running.pids["hub"] != old_hub:
                try:
                    hub_api(f"http://127.0.0.1:{running.hub_port}/", paths.secret("operator_token"), "/users/alice")
                    break
                except OSError:
                    pass
            time.sleep(0.3)
        else:
            raise AssertionError("the hub was not restarted" + ws.logs())
        # the same container in the same namespace, the kernel with its state, through the new hub's proxy route
        assert container_of(engine, "alice")["Id"] == before["Id"] and Path(f"/proc/{holder}").exists()
        deadline = time.monotonic() + 30
        while True:  # the killed hub's services ended with it; a cell runs once the new hub's audit answers
            res = ws.run_cell(s, "alice", "print(x + 1)", kernel_id=kernel)
            if not (res.error or "").startswith("AuditUnavailable") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert res.stdout.strip() == "42", (res, ws.logs())
        # the new hub did not start the holder, and still ends it with the server
        hub_api(
            f"http://127.0.0.1:{running.hub_port}/", paths.secret("operator_token"), "/users/alice/server", "DELETE"
        )
        subprocess.run(["timeout", "30", "tail", f"--pid={holder}", "-f", "/dev/null"], check=True)
        assert engine.containers(all=True) == []
        engine.close()
