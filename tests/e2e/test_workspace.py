"""The workspace through its front door: real directory, proxy, hub, spawner, servers and kernels."""

import json
import os
import pwd
import subprocess
import time

import pytest
import requests

from paitient.hub.paths import HubPaths
from paitient.hub.signon import NO_PROJECT_MESSAGE
from paitient.ops.up import Running, hub_api

pytestmark = pytest.mark.e2e


def operator(ws):
    token = (ws.state_dir / "hub" / "operator_token").read_text().strip()
    running = Running.read(HubPaths(ws.state_dir).up_file)
    return f"http://127.0.0.1:{running.hub_port}/", token


def services_of(ws) -> list[str]:
    """pids of the root-side services (ledger, audit, airlock) of this workspace."""
    out = subprocess.run(
        ["pgrep", "-f", f"paitient.cli service .*--state-dir={ws.state_dir}"], capture_output=True, text=True
    ).stdout.split()
    return out


def test_up_prints_ready_line_and_demo_accounts(workspace):
    text = "".join(workspace.output)
    assert f"paitient: workspace ready at {workspace.url}" in text
    for name in ("alice", "bob", "carol", "dave", "sam"):
        assert f"{name} " in text and workspace.password(name) in text


def test_member_signs_in_and_lands_in_jupyterlab_as_own_account(workspace):
    s = workspace.login("alice")
    workspace.start_server(s, "alice")
    lab = s.get(workspace.url + "user/alice/lab", timeout=30)
    assert lab.status_code == 200 and "JupyterLab" in lab.text
    member = workspace.member("alice")
    assert member.projects == ("oncology",) and "researcher" in member.roles
    # the server process runs as alice's own account, not root
    out = subprocess.run(["ps", "-o", "uid=,args=", "-u", str(member.uid)], capture_output=True, text=True).stdout
    assert "jupyterhub.singleuser" in out
    root_procs = subprocess.run(["ps", "-o", "args=", "-u", "0"], capture_output=True, text=True).stdout
    assert f"/user/{'alice'}" not in root_procs
    cell = workspace.run_cell(s, "alice", "import os; print(os.getuid(), os.environ.get('HOME'))")
    assert cell.error is None, cell
    uid, home = cell.stdout.split()
    assert int(uid) == member.uid and home == pwd.getpwnam(member.account).pw_dir


def test_home_is_private_to_its_owner(workspace):
    alice = workspace.login("alice")
    workspace.start_server(alice, "alice")
    bob = workspace.login("bob")
    workspace.start_server(bob, "bob")
    a, b = workspace.member("alice"), workspace.member("bob")
    home_a = pwd.getpwnam(a.account).pw_dir
    assert os.stat(home_a).st_mode & 0o077 == 0
    # on the host, bob's account cannot list alice's home
    r = subprocess.run(
        ["setpriv", f"--reuid={b.uid}", f"--regid={pwd.getpwnam(b.account).pw_gid}", "--clear-groups", "ls", home_a],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "Permission denied" in r.stderr
    # from bob's kernel neither
    cell = workspace.run_cell(
        bob, "bob", f"import os\ntry:\n  os.listdir({home_a!r})\nexcept OSError as e:\n  print(type(e).__name__)"
    )
    assert cell.stdout.strip() in ("PermissionError", "FileNotFoundError"), cell
    # and not through bob's server's contents API either
    r = workspace.api(bob, "bob", "GET", "contents/" + os.path.relpath(home_a, pwd.getpwnam(b.account).pw_dir))
    assert r.status_code in (403, 404)


@pytest.mark.parametrize(
    "user, password, message",
    [
        ("dave", None, NO_PROJECT_MESSAGE),
        ("alice", "wrong-password", "Invalid username or password"),
        ("alice", "", "Invalid username or password"),
        ("nobody-here", "whatever", "Invalid username or password"),
    ],
)
def test_sign_in_refused_with_a_message(workspace, user, password, message):
    with pytest.raises(PermissionError) as e:
        workspace.login(user, password)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "name",
    [
        "*",
        "alice)(uid=*",
        "al*",
        "alice,ou=people",
        "ali\\ce",
        "uid=alice",
        "alice\x00",
        " alice",
        "a" * 300,
        "ＡＬＩＣＥ",
    ],
)
def test_injection_usernames_never_sign_in(workspace, name):
    with pytest.raises(PermissionError):
        workspace.login(name, workspace.password("alice"))
    assert workspace.member(name) is None


def test_project_groups_and_steward_role_reach_the_hub(workspace):
    for user in ("alice", "carol", "sam"):
        workspace.login(user)
    base, token = operator(workspace)
    groups = {g["name"]: set(g["users"]) for g in hub_api(base, token, "/groups")}
    assert {"alice", "carol"} <= groups["oncology"] and "alice" not in groups.get("cardiometabolic", set())
    assert "carol" in groups["cardiometabolic"]
    sam = hub_api(base, token, "/users/sam")
    assert "steward" in sam["roles"]
    assert "steward" not in hub_api(base, token, "/users/alice")["roles"]


def test_status_reports_what_runs(workspace):
    out = subprocess.run(
        [*__import__("tests.e2e.workspace", fromlist=["PAITIENT"]).PAITIENT, "status", *workspace.args()],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert f"workspace at {workspace.url}" in out.stdout
    for name in ("directory", "proxy", "hub"):
        assert f"{name}" in out.stdout
    assert "NOT RUNNING" not in out.stdout


def test_hub_restart_keeps_user_servers(fresh_workspace):
    ws = fresh_workspace.start()
    s = ws.login("alice")
    ws.start_server(s, "alice")
    kernel = ws.start_kernel(s, "alice")
    assert ws.run_cell(s, "alice", "x = 41", kernel_id=kernel).error is None
    member = ws.member("alice")
    before = subprocess.run(
        ["pgrep", "-u", str(member.uid), "-f", "jupyterhub.singleuser"], capture_output=True, text=True
    ).stdout.split()
    running = Running.read(HubPaths(ws.state_dir).up_file)
    old_hub = running.pids["hub"]
    old_services = services_of(ws)
    assert len(old_services) == 3
    os.kill(old_hub, 9)  # the hardest way to lose the hub: no chance to clean up
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        running = Running.read(HubPaths(ws.state_dir).up_file)
        if running.pids["hub"] != old_hub:
            try:
                if requests.get(ws.url + "hub/api/", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
        time.sleep(0.3)
    else:
        raise AssertionError("hub was not restarted" + ws.logs())
    after = subprocess.run(
        ["pgrep", "-u", str(member.uid), "-f", "jupyterhub.singleuser"], capture_output=True, text=True
    ).stdout.split()
    assert before and before == after
    # the services of the killed hub ended with it; the new hub runs its own
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        new_services = services_of(ws)
        if len(new_services) == 3 and not set(old_services) & set(new_services):
            break
        time.sleep(0.2)
    assert len(new_services) == 3 and not set(old_services) & set(new_services), (old_services, new_services)
    # the kernel kept its state: same server, same kernel
    assert ws.run_cell(s, "alice", "print(x + 1)", kernel_id=kernel).stdout.strip() == "42"


def test_stop_ends_everything_it_started(fresh_workspace):
    ws = fresh_workspace.start()
    s = ws.login("bob")
    ws.start_server(s, "bob")
    running = Running.read(HubPaths(ws.state_dir).up_file)
    member = ws.member("bob")
    ws.stop(remove_accounts=False)
    for name, pid in running.pids.items():
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", name
    left = subprocess.run(["pgrep", "-u", str(member.uid)], capture_output=True, text=True).stdout.split()
    assert left == []
    assert not HubPaths(ws.state_dir).up_file.exists()
    # `up` again on the same state directory resumes: same directory passwords, same account, data kept
    password = ws.password("bob")
    ws.start()
    assert ws.password("bob") == password
    s = ws.login("bob")
    ws.start_server(s, "bob")
    assert ws.member("bob").uid == member.uid
    assert json.loads((ws.state_dir / "accounts.json").read_text())["bob"]["uid"] == member.uid


def test_every_service_page_is_routed_when_ready_is_printed(fresh_workspace):
    # the ready line comes only once the proxy routes the hub's services too (asked at once after it)
    ws = fresh_workspace.start()
    for name in ("ledger", "audit", "airlock"):
        r = requests.get(ws.url + f"services/{name}/", allow_redirects=False, timeout=10)
        assert r.status_code != 404 and r.status_code < 500, (name, r.status_code)
