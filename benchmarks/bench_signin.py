"""Sign-in -> server ready -> first cell result: paitient beside a plain JupyterHub on the same machine.

Both hubs sign in against the same directory (paitient's embedded demo directory) and run the server as
the same system account; the plain one uses the stock LDAPAuthenticator, LocalProcessSpawner and the
native kernel. Runs alternate between the two so that machine noise falls on both alike.

    sudo /opt/paitient/venv/bin/python benchmarks/bench_signin.py [--runs 5]

Prints each run, the medians and the ratio paitient / plain (goal: <= 1.05).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paitient.hub.paths import HubPaths, default_proxy_command  # noqa: E402
from paitient.ops.up import Running, free_port, hub_api  # noqa: E402
from tests.e2e.workspace import Workspace  # noqa: E402
from tests.groups import made_groups_removed  # noqa: E402

USER = "alice"

PLAIN_CONFIG = """
c.JupyterHub.bind_url = "http://127.0.0.1:{port}/"
c.JupyterHub.hub_port = {hub_port}
c.ConfigurableHTTPProxy.command = [{proxy!r}]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.JupyterHub.db_url = "sqlite:///{root}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{root}/cookie_secret"
c.JupyterHub.pid_file = "{root}/jupyterhub.pid"
c.JupyterHub.authenticator_class = "ldapauthenticator.LDAPAuthenticator"
c.LDAPAuthenticator.server_address = "127.0.0.1"
c.LDAPAuthenticator.server_port = {ldap_port}
c.LDAPAuthenticator.tls_strategy = "insecure"
c.LDAPAuthenticator.bind_dn_template = ["uid={{username}},ou=people,dc=hospital,dc=example"]
c.Authenticator.allow_all = True
c.Authenticator.username_map = {{"{user}": "{account}"}}
c.JupyterHub.spawner_class = "localprocess"
c.Spawner.cmd = ["{venv}/bin/jupyterhub-singleuser"]
c.Spawner.default_url = "/lab"
c.JupyterHub.services = [{{"name": "bench", "api_token": "{token}"}}]
c.JupyterHub.load_roles = [{{"name": "bench", "scopes": ["admin:servers", "list:users", "read:users"],
                            "services": ["bench"]}}]
"""


class PlainHub:
    """A stock JupyterHub + LocalProcessSpawner in a private directory, owned by this script."""

    def __init__(self, root: Path, ldap_port: int, account: str):
        self.root = root
        self.port, self.hub_port, self.proxy_api_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.token = os.urandom(16).hex()
        (root / "jupyterhub_config.py").write_text(
            PLAIN_CONFIG.format(
                port=self.port,
                hub_port=self.hub_port,
                proxy=default_proxy_command(),
                proxy_api_port=self.proxy_api_port,
                root=root,
                ldap_port=ldap_port,
                user=USER,
                account=account,
                venv=sys.prefix,
                token=self.token,
            )
        )
        self.proc: subprocess.Popen | None = None
        self.hub_user = account

    def start(self) -> None:
        log = open(self.root / "hub.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [f"{sys.prefix}/bin/jupyterhub", "-f", str(self.root / "jupyterhub_config.py")],
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "hub/login", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                time.sleep(0.2)
        raise RuntimeError("plain hub did not start; see " + str(self.root / "hub.log"))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            stop_servers(f"http://127.0.0.1:{self.hub_port}/", self.token)
            os.kill(self.proc.pid, signal.SIGTERM)  # the hub stops the proxy it started
            self.proc.wait(timeout=30)


def stop_servers(base: str, token: str) -> None:
    users = hub_api(base, token, "/users") or []
    for u in users:
        if u.get("servers"):
            try:
                hub_api(base, token, f"/users/{u['name']}/server", method="DELETE", timeout=30)
            except Exception:  # noqa: BLE001, S110 - 202 pending is raised by urllib as an error
                pass
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not any(u.get("servers") for u in hub_api(base, token, "/users") or []):
            return
        time.sleep(0.2)


PHASES = ("sign-in", "server", "kernel", "cell")


def one_run(ws: Workspace, hub_url: str, user: str, password: str, hub_user: str | None = None) -> dict[str, float]:
    """Seconds of each phase from posting the login form to the first cell's result, and the total.

    ``hub_user`` is the name the hub gives the user (the plain hub maps the login to the system account).
    """
    hub_user = hub_user or user
    probe = Workspace.__new__(Workspace)  # reuse the browser-like helpers against either hub
    probe.url, probe.state_dir = hub_url, ws.state_dir
    marks = [time.perf_counter()]
    s = requests.Session()
    args, kwargs = probe.login_form(s, user, password)
    r = s.post(*args, **kwargs)
    if "/hub/login" in r.url:
        raise RuntimeError(f"sign-in refused at {hub_url}")
    marks.append(time.perf_counter())
    probe.start_server(s, hub_user)
    marks.append(time.perf_counter())
    kernel = probe.start_kernel(s, hub_user)
    marks.append(time.perf_counter())
    cell = probe.run_cell(s, hub_user, "1 + 1", kernel_id=kernel)
    marks.append(time.perf_counter())
    if cell.result != "2":
        raise RuntimeError(f"unexpected cell result {cell}")
    out = {name: marks[i + 1] - marks[i] for i, name in enumerate(PHASES)}
    out["total"] = marks[-1] - marks[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: both hubs create and switch to system accounts")
    root = Path(tempfile.mkdtemp(prefix="paitient-bench-", dir="/tmp"))
    os.chmod(root, 0o755)
    (root / "paitient").mkdir(mode=0o755)
    ws = Workspace(root / "paitient", prefix="ptb")
    plain = None
    try:
        ws.start()
        password = ws.password(USER)
        base = f"http://127.0.0.1:{Running.read(HubPaths(ws.state_dir).up_file).hub_port}/"
        op_token = (ws.state_dir / "hub" / "operator_token").read_text().strip()
        # first sign-in creates the account (one-time cost, not measured), then stop
        one_run(ws, ws.url, USER, password)
        stop_servers(base, op_token)
        account = ws.member(USER).account
        ldap_port = int(Running.read(HubPaths(ws.state_dir).up_file).directory_url.rsplit(":", 1)[1].strip("/"))
        (root / "plain").mkdir(mode=0o755)
        plain = PlainHub(root / "plain", ldap_port, account)
        plain.start()
        one_run(ws, plain.url, USER, password, account)  # warm-up of the plain path
        stop_servers(f"http://127.0.0.1:{plain.hub_port}/", plain.token)
        times: dict[str, list[dict[str, float]]] = {"paitient": [], "plain": []}
        for i in range(args.runs):
            for name in ("plain", "paitient") if i % 2 else ("paitient", "plain"):
                if name == "paitient":
                    t = one_run(ws, ws.url, USER, password)
                    stop_servers(base, op_token)
                else:
                    t = one_run(ws, plain.url, USER, password, account)
                    stop_servers(f"http://127.0.0.1:{plain.hub_port}/", plain.token)
                times[name].append(t)
                print(f"run {i + 1} {name:<9} " + "  ".join(f"{k} {v:5.2f}" for k, v in t.items()), flush=True)
        print("\nmedians (s):" + "".join(f"{k:>10}" for k in (*PHASES, "total")))
        med = {}
        for name, runs in times.items():
            med[name] = {k: statistics.median(r[k] for r in runs) for k in (*PHASES, "total")}
            print(f"  {name:<10}" + "".join(f"{med[name][k]:10.2f}" for k in (*PHASES, "total")))
        ratio = med["paitient"]["total"] / med["plain"]["total"]
        print(f"ratio paitient / plain, sign-in -> first cell: {ratio:.3f}  (goal <= 1.05)")
    finally:
        if plain is not None:
            plain.stop()
        ws.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    with made_groups_removed(workspace=True):  # the groups its publications made
        main()
