"""The workspace through its front door: real directory, proxy, hub, spawner, servers and kernels."""

import base64
import html
import json
import os
import pwd
import re
import subprocess
import time
from pathlib import Path

import pytest
import requests

from paitient.hub.paths import SERVER_MODULE, HubPaths
from paitient.hub.signon import NO_PROJECT_MESSAGE
from paitient.hub.tokens import WITHDRAWN_REASON
from paitient.ops.up import Running, hub_api
from paitient.services import SERVICES
from paitient.services.audit.query import newest_first
from tests.e2e.workspace import mapped_packages

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
    assert SERVER_MODULE in out
    root_procs = subprocess.run(["ps", "-o", "args=", "-u", "0"], capture_output=True, text=True).stdout
    assert f"/user/{'alice'}" not in root_procs
    cell = workspace.run_cell(s, "alice", "import os; print(os.getuid(), os.environ.get('HOME'))")
    assert cell.error is None, cell
    uid, home = cell.stdout.split()
    assert int(uid) == member.uid and home == pwd.getpwnam(member.account).pw_dir


def test_the_users_server_serves_without_the_hubs_database_layer(workspace):
    """The server leaves SQLAlchemy, alembic and the hub's handlers out (paitient.server.singleuser): it still
    signs the researcher in through the hub, answers the API and runs a cell, with JupyterHub's own HTTP
    client loaded and no SQLAlchemy in the process."""
    s = workspace.login("alice")
    workspace.start_server(s, "alice")  # the hub's OAuth: the server asked the hub about alice's token
    assert workspace.api(s, "alice", "GET", "contents").status_code == 200
    cell = workspace.run_cell(s, "alice", "print(6 * 7)")
    assert cell.error is None and cell.stdout == "42\n", cell
    loaded = mapped_packages(workspace.server_pid("alice"))
    assert {"aiohttp", "tornado", "zmq"} <= loaded, loaded  # JupyterHub's HTTP client, the web server, ZMQ
    assert "sqlalchemy" not in loaded, loaded


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
        ["pgrep", "-u", str(member.uid), "-f", SERVER_MODULE], capture_output=True, text=True
    ).stdout.split()
    running = Running.read(HubPaths(ws.state_dir).up_file)
    old_hub = running.pids["hub"]
    old_services = services_of(ws)
    assert len(old_services) == len(SERVICES)
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
        ["pgrep", "-u", str(member.uid), "-f", SERVER_MODULE], capture_output=True, text=True
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


# ------------------------------------------------------------------ landing, API tokens, Lab, examples


def stop_server(ws, user: str, timeout: float = 60.0) -> None:
    """Stop ``user``'s server through the hub (operator token), if they have one, and wait until it is gone."""
    base, token = operator(ws)
    auth = {"Authorization": f"token {token}"}

    def servers() -> dict:
        r = requests.get(base + f"hub/api/users/{user}", headers=auth, timeout=30)
        if r.status_code == 404:  # never signed in
            return {}
        r.raise_for_status()
        return r.json().get("servers") or {}

    if servers():
        r = requests.delete(base + f"hub/api/users/{user}/server", headers=auth, timeout=30)
        assert r.status_code in (202, 204), r.text
    deadline = time.monotonic() + timeout
    while servers():
        assert time.monotonic() < deadline, f"server of {user} did not stop" + ws.logs()
        time.sleep(0.3)


def hub_xsrf(s: requests.Session) -> dict[str, str]:
    """The header a page of the hub sends with its API calls (the hub's `_xsrf` cookie)."""
    return {"X-XSRFToken": s.cookies.get("_xsrf", path="/hub/")}


def test_sign_in_starts_the_server_and_lands_in_jupyterlab_without_a_start_button(workspace):
    stop_server(workspace, "carol")
    visit = workspace.browser_login("carol")
    lab = workspace.url + "user/carol/lab"
    assert visit.page.status_code == 200 and visit.page.url.startswith(lab), (visit.visited, workspace.logs())
    assert "JupyterLab" in visit.page.text
    paths = [u.removeprefix(workspace.url.rstrip("/")) for u in visit.visited]
    # the hub started the server and showed its progress page; never its home page or a Launch button
    assert "/hub/spawn" in paths and "/hub/spawn-pending/carol" in paths, paths
    assert not any(p.startswith("/hub/home") or p.startswith("/hub/user/carol") for p in paths), paths
    # signed in again while the server runs: straight into Lab, no progress page
    again = workspace.browser_login("carol")
    assert again.page.url.startswith(lab) and "JupyterLab" in again.page.text
    assert not any("/hub/spawn" in u for u in again.visited), again.visited


def test_steward_lands_at_the_airlock_review_page_without_a_server(workspace):
    stop_server(workspace, "sam")
    visit = workspace.browser_login("sam")
    assert visit.page.status_code == 200 and visit.page.url == workspace.url + "services/airlock/", visit.visited
    assert not any("/hub/spawn" in u or "/user/sam" in u for u in visit.visited), visit.visited
    base, token = operator(workspace)
    assert hub_api(base, token, "/users/sam")["servers"] == {}


def test_a_new_users_home_holds_the_examples_owned_by_them_and_never_replaced(workspace):
    from paitient.hub.examples import shipped

    examples = shipped()
    assert {"01-explore-data.ipynb", "README.md"} <= set(examples)
    s = workspace.browser_login("carol").session
    member = workspace.member("carol")
    home = pwd.getpwnam(member.account).pw_dir
    listing = workspace.api(s, "carol", "GET", "contents/")
    assert listing.status_code == 200, listing.text[:300]
    assert set(examples) <= {item["name"] for item in listing.json()["content"]}
    for name in examples:
        st = os.lstat(os.path.join(home, name))
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (member.uid, pwd.getpwnam(member.account).pw_gid, 0o600)
    # carol edits one example and deletes another; after her server starts again the edit stays and the
    # deleted one is back
    edited = json.loads(examples["01-explore-data.ipynb"])
    edited["cells"][0]["source"] = "# carol's notes\n"
    body = {"type": "notebook", "format": "json", "content": edited}
    r = workspace.api(s, "carol", "PUT", "contents/01-explore-data.ipynb", json=body)
    assert r.status_code == 200, r.text[:300]
    assert workspace.api(s, "carol", "DELETE", "contents/README.md").status_code == 204
    stop_server(workspace, "carol")
    assert not os.path.exists(os.path.join(home, "README.md"))
    workspace.browser_login("carol")
    with open(os.path.join(home, "01-explore-data.ipynb")) as f:
        assert "".join(json.load(f)["cells"][0]["source"]) == "# carol's notes\n"
    with open(os.path.join(home, "README.md"), "rb") as f:
        assert f.read() == examples["README.md"]
    assert os.stat(os.path.join(home, "README.md")).st_uid == member.uid


def test_lab_asks_no_news_question_by_default(workspace):
    s = workspace.login("alice")
    workspace.start_server(s, "alice")
    r = workspace.api(s, "alice", "GET", "../lab/api/settings/@jupyterlab/apputils-extension:notification")
    assert r.status_code == 200, r.text[:300]
    setting = r.json()
    properties = setting["schema"]["properties"]
    assert properties["fetchNews"]["default"] == "false" and properties["checkForUpdates"]["default"] is False
    assert "fetchNews" not in (setting.get("settings") or {})  # the default, not a user's choice
    # set from the root-owned configuration the spawner wrote, not from anything alice can change
    overrides = HubPaths(workspace.state_dir).user_dir(workspace.member("alice").account) / "data/lab/settings"
    st = os.stat(overrides / "overrides.json")
    assert st.st_uid == 0 and st.st_mode & 0o022 == 0 and os.stat(overrides).st_uid == 0


def test_researcher_gets_no_api_token_steward_does(workspace):
    from paitient.hub.signon import NO_TOKENS_MESSAGE

    alice = workspace.login("alice")
    # as the hub resolves her roles after signing in: no token scope at all (JupyterHub's `self` has one)
    held = alice.get(workspace.url + "hub/api/user", timeout=30).json()["scopes"]
    assert "access:servers!user=alice" in held and not {s.split("!")[0] for s in held} & {"tokens", "read:tokens"}
    tokens_of = workspace.url + "hub/api/users/{}/tokens"
    r = alice.post(tokens_of.format("alice"), json={"note": "script"}, headers=hub_xsrf(alice), timeout=30)
    assert r.status_code == 403 and r.json()["message"] == NO_TOKENS_MESSAGE, r.text
    # with the password in the body instead of a session: the same answer
    r = requests.post(
        workspace.url + "hub/api/users/alice/tokens",
        json={"auth": {"username": "alice", "password": workspace.password("alice")}},
        timeout=30,
    )
    assert r.status_code == 403 and r.json()["message"] == NO_TOKENS_MESSAGE, r.text
    refusals = [r for r in newest_first(workspace.state_dir / "audit") if r["action"] == "auth.token"]
    assert [(r["actor"], r["object"], r["outcome"]) for r in refusals[:2]] == [("alice", "alice", "denied")] * 2
    # nobody identified learns nothing about the account
    r = requests.post(workspace.url + "hub/api/users/alice/tokens", json={}, timeout=30)
    assert r.status_code == 403 and NO_TOKENS_MESSAGE not in r.text
    # no Token page in her menu, and the page itself refuses her
    home = alice.get(workspace.url + "hub/home", timeout=30)
    assert home.status_code == 200 and 'href="/hub/home"' in home.text
    assert 'href="/hub/token"' not in home.text
    page = alice.get(workspace.url + "hub/token", timeout=30)
    assert page.status_code == 403 and NO_TOKENS_MESSAGE in page.text
    # everything else still works: her server, and her sign-in to the airlock's pages through the hub's OAuth
    workspace.start_server(alice, "alice")
    r = alice.get(workspace.url + "services/airlock/", timeout=30)
    assert r.status_code == 200 and r.url == workspace.url + "services/airlock/", r.url
    # the steward keeps tokens: the menu lists the page, the API issues one, and it works
    sam = workspace.login("sam")
    assert "tokens!user=sam" in sam.get(workspace.url + "hub/api/user", timeout=30).json()["scopes"]
    assert 'href="/hub/token"' in sam.get(workspace.url + "hub/home", timeout=30).text
    assert sam.get(workspace.url + "hub/token", timeout=30).status_code == 200
    r = sam.post(tokens_of.format("sam"), json={"note": "review script"}, headers=hub_xsrf(sam), timeout=30)
    assert r.status_code == 201, r.text
    who = requests.get(
        workspace.url + "hub/api/user", headers={"Authorization": f"token {r.json()['token']}"}, timeout=30
    )
    assert who.status_code == 200 and who.json()["name"] == "sam"
    # the operator's token still works
    base, token = operator(workspace)
    assert hub_api(base, token, "/users/alice")["name"] == "alice"


def test_an_admin_makes_no_token_for_another_account_and_no_researcher_is_an_admin(fresh_workspace):
    """Attack (a review's): JupyterHub lets an admin make an API token for any account, and its admin role
    cannot be narrowed. A researcher in the admin group made a steward's token and approved her own release as
    him; and an admin reached every researcher's server. An admin (Dave, in no project) is now refused a token
    for Sam, on the record, and Alice's server turns him away; Bob, a researcher in the admin group, signs in
    as a researcher alone."""
    from paitient.hub import tokens
    from paitient.hub.hubconfig import NO_OPTIONS_MESSAGE
    from paitient.ops.demo import DEMO_BASE_DN

    ws = fresh_workspace
    ws.start()
    ws.directory_modify(
        f"dn: cn=workspace-admins,ou=groups,{DEMO_BASE_DN}\nchangetype: modify\n"
        f"add: member\nmember: uid=dave,ou=people,{DEMO_BASE_DN}\nmember: uid=bob,ou=people,{DEMO_BASE_DN}\n"
    )
    ws.login("sam")  # the steward has signed in before: the hub knows his account
    dave = ws.login("dave")
    assert dave.get(ws.url + "hub/api/user", timeout=30).json()["admin"] is True
    r = dave.post(ws.url + "hub/api/users/sam/tokens", json={"note": "x"}, headers=hub_xsrf(dave), timeout=30)
    assert r.status_code == 403 and r.json()["message"] == tokens.FOR_ANOTHER_MESSAGE, r.text
    # the same with his password in the body instead of a session (JupyterHub's handler takes both)
    r = requests.post(
        ws.url + "hub/api/users/sam/tokens",
        json={"auth": {"username": "dave", "password": ws.password("dave")}},
        timeout=30,
    )
    assert r.status_code == 403 and r.json()["message"] == tokens.FOR_ANOTHER_MESSAGE, r.text
    refused = [r for r in newest_first(ws.state_dir / "audit") if r["action"] == "auth.token"][:2]
    assert [(r["actor"], r["object"], r["outcome"]) for r in refused] == [("dave", "sam", "denied")] * 2
    assert {r["details"]["reason"] for r in refused} == {tokens.OTHERS_REASON}
    # his own token he may still make
    r = dave.post(ws.url + "hub/api/users/dave/tokens", json={"note": "operate"}, headers=hub_xsrf(dave), timeout=30)
    assert r.status_code == 201, r.text
    bob = ws.login("bob").get(ws.url + "hub/api/user", timeout=30).json()
    assert bob["admin"] is False and "researcher" in bob["roles"] and "admin" not in bob["roles"]
    # the hub lets the admin through its sign-in to alice's server (the admin role holds access:servers);
    # her server signs in its owner alone
    alice = ws.login("alice")
    # a start with options (the hub's API keeps them for a spawner that reads them) is refused, saying why
    r = alice.post(
        ws.url + "hub/api/users/alice/server",
        json={"user_options": {"image": "someone/else"}},
        headers=hub_xsrf(alice),
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["message"] == NO_OPTIONS_MESSAGE, r.text
    ws.start_server(alice, "alice")
    assert alice.get(ws.url + "user/alice/api/status", timeout=30).status_code == 200
    r = dave.get(ws.url + "user/alice/lab", timeout=30)  # a page: the server sends him to the hub's sign-in
    # JupyterHub asks him to confirm the access to another account's server, and then grants it
    assert "/hub/api/oauth2/authorize" in r.url and r.status_code == 200 and "Authorize" in r.text, r.url
    confirm = {
        "_xsrf": html.unescape(re.search(r'name="_xsrf" value="([^"]+)"', r.text).group(1)),
        "scopes": re.findall(r'name="scopes" value="([^"]+)"', r.text),
    }
    r = dave.post(r.url, data=confirm, timeout=30)
    assert r.status_code == 403 and "only its owner signs in here" in r.text, (r.status_code, r.url, r.text[:300])


def test_a_token_held_from_before_joining_a_project_is_revoked(fresh_workspace):
    # Sam, a steward, holds API tokens; then the directory's admins put him in a project, which makes
    # him a researcher. His tokens must stop working, the very request that finds out included.
    from paitient.hub import tokens
    from paitient.hub.signon import NO_TOKENS_MESSAGE
    from paitient.ops.demo import DEMO_BASE_DN

    ws = fresh_workspace
    ws.site_file.write_text(ws.site_file.read_text().replace("[directory]\n", "[directory]\nrefresh_seconds = 1\n", 1))
    ws.start()
    sam = ws.login("sam")
    tokens_of = ws.url + "hub/api/users/sam/tokens"
    # the note the hub gives its servers' own tokens is not for the taking
    r = sam.post(tokens_of, json={"note": "Server at /user/sam/"}, headers=hub_xsrf(sam), timeout=30)
    assert r.status_code == 400 and r.json()["message"] == tokens.RESERVED_NOTE_MESSAGE, r.text
    held = []
    for note in ("review script", "nightly export"):
        r = sam.post(tokens_of, json={"note": note}, headers=hub_xsrf(sam), timeout=30)
        assert r.status_code == 201, r.text
        held.append({"Authorization": f"token {r.json()['token']}"})
    assert requests.get(ws.url + "hub/api/user", headers=held[0], timeout=30).json()["name"] == "sam"

    ws.directory_modify(
        f"dn: cn=oncology,ou=groups,{DEMO_BASE_DN}\nchangetype: modify\n"
        f"add: member\nmember: uid=sam,ou=people,{DEMO_BASE_DN}\n"
    )
    time.sleep(1.5)  # refresh_seconds: the hub reads his groups again at his next request
    for auth in held:  # the request that finds out is refused, and both are gone, not only the one used
        r = requests.get(ws.url + "hub/api/user", headers=auth, timeout=30)
        assert r.status_code == 403, r.text
    # his browser session goes on, now as a researcher, and mints no new token
    assert "researcher" in {role for role in sam.get(ws.url + "hub/api/user", timeout=30).json()["roles"]}
    r = sam.post(tokens_of, json={"note": "again"}, headers=hub_xsrf(sam), timeout=30)
    assert r.status_code == 403 and r.json()["message"] == NO_TOKENS_MESSAGE, r.text
    revoked = [r for r in newest_first(ws.state_dir / "audit") if r["action"] == "auth.token" and r["outcome"] == "ok"]
    assert [(r["actor"], r["object"], r["details"]["revoked"]) for r in revoked] == [("system", "sam", 2)]


def _token_in_server_cookie(s: requests.Session, user: str) -> str:
    """The OAuth token inside the server's cookie (tornado signs its cookies, it does not encrypt them): what the
    server checks with the hub, and what a researcher's browser holds and could use elsewhere."""
    value = next(c.value for c in s.cookies if c.name.startswith(f"jupyterhub-user-{user}"))
    return base64.b64decode(value.split("|")[4].split(":", 1)[1]).decode()


def _withdrawn(ws, name: str) -> list[dict]:
    return [
        r
        for r in newest_first(ws.state_dir / "audit")
        if r["action"] == "auth.token" and r["object"] == name and r["details"]["reason"] == WITHDRAWN_REASON
    ]


def test_a_researcher_taken_out_of_her_project_loses_her_server_and_every_token_at_the_next_refresh(
    fresh_workspace,
):
    # Alice works in JupyterLab; the directory's admins take her out of her only project. Her browser
    # holds the OAuth token of her server's cookie, which the hub would otherwise honour until it expires.
    from paitient.ops.demo import DEMO_BASE_DN

    ws = fresh_workspace
    ws.site_file.write_text(ws.site_file.read_text().replace("[directory]\n", "[directory]\nrefresh_seconds = 1\n", 1))
    ws.start()
    s = ws.login("alice")
    ws.start_server(s, "alice")
    kernel = ws.start_kernel(s, "alice")
    assert "oncology" in ws.run_cell(s, "alice", "import os; print(os.listdir('/data'))", kernel).stdout
    pid = ws.server_pid("alice")
    auth = {"Authorization": f"token {_token_in_server_cookie(s, 'alice')}"}
    assert requests.get(ws.url + "hub/api/user", headers=auth, timeout=30).status_code == 200

    ws.directory_modify(
        f"dn: cn=oncology,ou=groups,{DEMO_BASE_DN}\nchangetype: modify\n"
        f"delete: member\nmember: uid=alice,ou=people,{DEMO_BASE_DN}\n"
    )
    time.sleep(1.5)  # refresh_seconds: the next request made with her token reads the directory again
    r = requests.get(ws.url + "hub/api/user", headers=auth, timeout=30)
    assert r.status_code == 403, r.text  # the very request that finds out
    assert requests.get(ws.url + "hub/api/user", headers=auth, timeout=30).status_code == 403  # and it is gone
    assert s.get(ws.url + "hub/api/user", timeout=30).status_code == 403  # her hub session too
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{pid}").exists(), "her server still runs"
    r = ws.api(s, "alice", "GET", "kernels", allow_redirects=False)
    assert r.status_code != 200, r.text
    (record,) = _withdrawn(ws, "alice")
    assert record["actor"] == "system" and record["details"]["revoked"] >= 2  # the server's and the sign-ins


def test_a_steward_taken_out_of_the_steward_group_loses_his_tokens_at_the_next_refresh(fresh_workspace):
    # Stewards may hold API tokens (review scripts). One that outlived his stewardship would keep the audit
    # trail and the airlock open to him for as long as it lives: without an expiry, for ever.
    from paitient.ops.demo import DEMO_BASE_DN

    ws = fresh_workspace
    ws.site_file.write_text(ws.site_file.read_text().replace("[directory]\n", "[directory]\nrefresh_seconds = 1\n", 1))
    ws.start()
    sam = ws.login("sam")
    r = sam.post(ws.url + "hub/api/users/sam/tokens", json={"note": "review script"}, headers=hub_xsrf(sam), timeout=30)
    assert r.status_code == 201, r.text
    auth = {"Authorization": f"token {r.json()['token']}"}
    assert requests.get(ws.url + "services/audit/api/records", headers=auth, timeout=30).status_code == 200

    ws.directory_modify(
        f"dn: cn=data-stewards,ou=groups,{DEMO_BASE_DN}\nchangetype: modify\n"
        f"delete: member\nmember: uid=sam,ou=people,{DEMO_BASE_DN}\n"
    )
    time.sleep(1.5)
    assert requests.get(ws.url + "hub/api/user", headers=auth, timeout=30).status_code == 403
    # a service that checked the token before keeps its answer for a minute (its HubOAuth cache), then asks again
    for path in ("services/audit/api/records", "services/airlock/api/requests"):
        deadline = time.monotonic() + 90
        while (r := requests.get(ws.url + path, headers=auth, timeout=30)).status_code == 200:
            assert time.monotonic() < deadline, f"{path} still answers his token"
            time.sleep(2)
        assert r.status_code == 403, (path, r.status_code, r.text[:200])
    r = requests.post(ws.url + "hub/api/users/sam/tokens", json={"note": "again"}, headers=auth, timeout=30)
    assert r.status_code == 403, r.text
    (record,) = _withdrawn(ws, "sam")
    assert record["details"]["revoked"] >= 1
    assert json.loads((ws.state_dir / "hub" / "role_holders.json").read_text())["sam"] == []  # kept over restarts


def test_the_servers_own_token_cannot_mint_a_token_either(workspace):
    # The server's API token sits in its environment, in the researcher's own process: take it as an
    # attacker would and ask the hub for a token with it.
    from paitient.hub.signon import NO_TOKENS_MESSAGE

    s = workspace.login("alice")
    workspace.start_server(s, "alice")
    member = workspace.member("alice")
    pid = subprocess.run(
        ["pgrep", "-u", str(member.uid), "-f", SERVER_MODULE], capture_output=True, text=True
    ).stdout.split()[0]
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    server_token = env[b"JUPYTERHUB_API_TOKEN"].decode()
    auth = {"Authorization": f"token {server_token}"}
    who = requests.get(workspace.url + "hub/api/user", headers=auth, timeout=30)
    held = {scope.split("!")[0] for scope in who.json()["scopes"]}
    assert who.status_code == 200 and not held & {"tokens", "read:tokens", "inherit"}, held
    r = requests.post(workspace.url + "hub/api/users/alice/tokens", json={}, headers=auth, timeout=30)
    assert r.status_code == 403 and r.json()["message"] == NO_TOKENS_MESSAGE
