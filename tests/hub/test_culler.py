"""The hub's idle culler: a hub-managed service from ``[server] cull_timeout``, with the culler's least role."""

import os
import subprocess
import sys
import time
import tomllib

import pytest
from jupyterhub import orm, scopes
from jupyterhub_idle_culler import IdleCuller
from traitlets.config import Config

from paitient.config import EMBEDDED_SITE, parse
from paitient.hub.culler import CULLER_SCOPES, CULLER_SERVICE, DIE_WITH_HUB, cull_every
from paitient.hub.hubconfig import configure


def hub_config(tmp_path, **server) -> Config:
    raw = tomllib.loads(EMBEDDED_SITE.read_text())
    raw["workspace"]["state_dir"] = str(tmp_path / "state")
    raw["server"] = server
    (tmp_path / "state" / "hub").mkdir(parents=True, exist_ok=True)
    return configure(Config(), parse(raw), directory_url="ldap://127.0.0.1:3890/", hub_port=1, proxy_api_port=2)


def services(c: Config) -> dict[str, dict]:
    return {s["name"]: s for s in c.JupyterHub.services}


def roles(c: Config) -> dict[str, dict]:
    return {r["name"]: r for r in c.JupyterHub.load_roles}


def test_the_culler_is_a_managed_service_with_the_sites_timeout(tmp_path):
    c = hub_config(tmp_path, cull_timeout=600)
    entry = services(c)[CULLER_SERVICE]
    assert entry["command"][: len(DIE_WITH_HUB)] == DIE_WITH_HUB
    python, *argv = entry["command"][len(DIE_WITH_HUB) :]
    assert argv[:3] == ["-I", "-m", "jupyterhub_idle_culler"]  # no import from the hub's working folder
    assert entry["cwd"] == str(tmp_path / "state" / "hub") and entry["display"] is False
    assert "api_token" not in entry and "admin" not in entry  # the hub makes its token; its role says what it may
    # the installed culler understands every option it is given, and reads no configuration file
    culler = IdleCuller()
    culler.parse_command_line(argv[3:])
    assert (culler.timeout, culler.cull_every, culler.config_file) == (600, 150, "")
    assert culler.cull_users is False  # servers stop; users and their homes stay


def test_the_culler_holds_the_four_scopes_it_documents_and_nothing_more(tmp_path):
    c = hub_config(tmp_path, cull_timeout=3600)
    role = roles(c)[CULLER_SERVICE]
    assert role["services"] == [CULLER_SERVICE]
    assert sorted(role["scopes"]) == sorted(["list:users", "read:users:activity", "read:servers", "delete:servers"])
    assert tuple(role["scopes"]) == CULLER_SCOPES
    scopes._check_scopes_exist(role["scopes"])  # names JupyterHub knows (raises otherwise)
    held = {s.split("!", 1)[0] for s in scopes.expand_scopes(frozenset(role["scopes"]), owner=orm.Service(name="x"))}
    assert {"list:users", "read:users:activity", "read:servers", "delete:servers"} <= held
    for power in ("admin:users", "admin:servers", "servers", "tokens", "read:tokens", "access:servers", "users"):
        assert power not in held, power  # it cannot start servers, act as a user, or read tokens
    # no other role names the culler's service
    assert [r["name"] for r in c.JupyterHub.load_roles if CULLER_SERVICE in r.get("services", ())] == [CULLER_SERVICE]


def test_a_cull_timeout_of_zero_runs_no_culler(tmp_path):
    c = hub_config(tmp_path, cull_timeout=0)
    assert CULLER_SERVICE not in services(c) and CULLER_SERVICE not in roles(c)


def test_the_culler_runs_by_default(tmp_path):
    c = hub_config(tmp_path)
    assert "--timeout=7200" in services(c)[CULLER_SERVICE]["command"]


@pytest.mark.parametrize(("timeout", "every"), [(60, 15), (100, 25), (1200, 300), (86400, 300)])
def test_the_culler_looks_at_a_quarter_of_the_timeout_between_15_s_and_5_min(timeout, every):
    assert cull_every(timeout) == every


def test_the_culler_ends_when_the_hub_that_started_it_is_killed():
    # A stand-in hub starts a long-running command with the culler's prefix, reports its pid, and is killed;
    # the command must not outlive it (a killed hub cannot stop its managed services itself).
    hub = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; "
            f"p = subprocess.Popen({DIE_WITH_HUB!r} + ['sleep', '300']); print(p.pid, flush=True); time.sleep(300)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(hub.stdout.readline())  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while open(f"/proc/{child}/comm").read().strip() != "sleep":  # setpriv has set the signal and gone
        assert time.monotonic() < deadline, "the command did not start"
        time.sleep(0.01)
    hub.kill()
    hub.wait(10)
    hub.stdout.close()  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":  # ended; init has not reaped it yet
            break
        time.sleep(0.05)
    else:
        os.kill(child, 9)
        pytest.fail("the command outlived the hub that started it")
