"""`paitient install`: systemd units that run what `paitient up` runs, hardened, from the site configuration.

systemd is not process 1 in the test container, so the units are not started through it: they are checked with
`systemd-analyze verify` (which loads them as systemd would and checks every ExecStart program), parsed for
their hardening, compared with the commands `up` starts, and the proxy unit's command is run with its
environment file to show the two work together.
"""

from __future__ import annotations

import configparser
import json
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from paitient.config import load, parse
from paitient.hub.engine import Engine, image_tag
from paitient.hub.paths import HubPaths, default_proxy_command
from paitient.ops.install import (
    ENGINE_UNIT,
    HUB_UNIT,
    PROXY_UNIT,
    TARGET,
    InstallError,
    fixed_ports,
    service_unit,
    units,
    write_units,
)
from paitient.ops.up import UpCommand
from paitient.services import SERVICES
from paitient.services.kit.process import SEPARATE_PORTS, free_port

SITE_TOML = """
[workspace]
state_dir = "{state_dir}"
port = {port}
proxy_api_port = {api_port}

[directory]
url = "ldaps://ad.hospital.example/"
lookup_dn = true
search_base = "ou=people,dc=hospital,dc=example"
user_attribute = "sAMAccountName"

[[projects]]
name = "oncology"
group = "oncology"
datasets = ["breast_cancer"]
stewards = ["sam"]
"""

PROXY = default_proxy_command()


@pytest.fixture
def site():
    """A production-like site: the hospital's directory over LDAPS, state under /var/lib (not a private tmp)."""
    state = Path(tempfile.mkdtemp(prefix="paitient-install-test-", dir="/var/lib"))
    text = SITE_TOML.format(state_dir=state, port=free_port(), api_port=free_port())
    (state / "site.toml").write_text(text)
    yield parse(tomllib.loads(text), source=str(state / "site.toml"))
    shutil.rmtree(state, ignore_errors=True)


def variant(site, **sections: dict):
    """The site read again from its file with ``sections`` overriding it."""
    return load(site.source, overrides=sections)


def read_unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=False, comment_prefixes=("#",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keep the directives' case
    unit.read_string(path.read_text())
    return unit


def verify(written: list[Path], unit_dir: Path) -> None:
    """``systemd-analyze verify`` of the units: loaded as systemd would, every program they run there."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is part of the systemd package the setup installs"
    verified = subprocess.run(
        [analyze, "verify", *(str(p) for p in written)], capture_output=True, text=True, timeout=120, cwd=unit_dir
    )
    assert verified.returncode == 0 and not verified.stdout.strip() and not verified.stderr.strip(), verified


def test_the_units_verify_and_carry_their_hardening(site, world_tmp):
    unit_dir = world_tmp / "units"
    written = write_units(site, PROXY, unit_dir)
    service_units = [service_unit(name) for name in SERVICES]
    assert sorted(p.name for p in written) == sorted([PROXY_UNIT, HUB_UNIT, TARGET, *service_units])
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644

    verify(written, unit_dir)

    proxy, hub, target = (read_unit(unit_dir / n) for n in (PROXY_UNIT, HUB_UNIT, TARGET))
    services = {name: read_unit(unit_dir / service_unit(name)) for name in SERVICES}
    for unit in (proxy, hub, *services.values()):
        s = unit["Service"]
        assert s["NoNewPrivileges"] == "yes" and s["ProtectSystem"] == "strict" and s["PrivateTmp"] == "yes"
        assert s["Restart"] == "on-failure"
        assert Path(shlex.split(s["ExecStart"])[0]).is_file()
        assert os.access(shlex.split(s["ExecStart"])[0], os.X_OK)
        assert unit["Install"]["WantedBy"] == TARGET
    # the proxy needs no privilege: a transient user, no capabilities, no homes, network families only
    p = proxy["Service"]
    assert p["DynamicUser"] == "yes" and p["CapabilityBoundingSet"] == "" and p["ProtectHome"] == "yes"
    assert p["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    # the hub runs as root, after the proxy and the services, writing only its state, the homes and /etc
    # (useradd); it starts no service and runs no sandbox (no netlink)
    h = hub["Service"]
    assert h["User"] == "root" and h["ProtectHome"] == "no"
    assert {str(site.state_dir), site.accounts.home_root, "/etc"} <= set(h["ReadWritePaths"].split())
    assert h["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert {PROXY_UNIT, *service_units} <= set(hub["Unit"]["After"].split()) and hub["Unit"]["Requires"] == PROXY_UNIT
    assert "--separate-services=airlock:8104,audit:8103,egress:8105,jobs:8106,ledger:8102" in h["ExecStart"].split()
    assert set(target["Unit"]["Wants"].split()) == {PROXY_UNIT, HUB_UNIT, *service_units}
    # each service: root (its socket, its store), writing its state only; /etc and the data read-only
    for name, unit in services.items():
        sv = unit["Service"]
        argv = shlex.split(sv["ExecStart"])
        assert argv[argv.index("service") + 1] == name and "--separate" in argv
        assert sv["User"] == "root" and "/etc" not in sv["ReadWritePaths"].split()
        assert str(site.data_root) not in sv["ReadWritePaths"].split()
        assert service_unit(name) in hub["Unit"]["After"].split() and unit["Unit"]["Before"] == HUB_UNIT
        families = sv["RestrictAddressFamilies"].split()
        if name in ("ledger", "audit", "egress"):
            # no sandbox, no home: no namespaces, no devices, no netlink
            assert sv["ReadWritePaths"] == str(site.state_dir) and sv["ProtectHome"] == "yes"
            assert sv["RestrictNamespaces"] == "yes" and sv["PrivateDevices"] == "yes"
            assert families == ["AF_UNIX", "AF_INET", "AF_INET6"]
        else:
            # bubblewrap: namespaces, and netlink for each sandbox's loopback
            assert "RestrictNamespaces" not in sv and "AF_NETLINK" in families
            writable = [str(site.state_dir), *([site.accounts.home_root] if name == "launcher" else [])]
            assert sv["ReadWritePaths"].split() == writable
            assert sv["ProtectHome"] == ("no" if name == "launcher" else "yes")
        # control groups are read-only but to the launcher, which makes each account's cpu group
        assert sv["ProtectControlGroups"] == ("no" if name == "launcher" else "yes")
    for name, port in SEPARATE_PORTS.items():
        argv = shlex.split(services[name]["Service"]["ExecStart"])
        token_file = site.state_dir / "hub" / f"service_{name}_token"
        assert {f"--port={port}", f"--hub-port={fixed_ports(site)[0]}", f"--token-file={token_file}"} <= set(argv)
        st = token_file.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0) and len(token_file.read_text().strip()) == 64

    env = site.state_dir / "hub" / "proxy.env"
    st = env.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0)
    assert env.read_text() == f"CONFIGPROXY_AUTH_TOKEN={HubPaths.of(site).secret('proxy_token')}\n"
    assert p["EnvironmentFile"] == str(env)


def test_the_units_run_what_up_runs(site, monkeypatch):
    # `up` with its process starts recorded instead of made: the units' ExecStart must be the same commands
    started: dict[str, tuple[list[str], dict[str, str] | None]] = {}
    up = UpCommand(separate_services=True)
    up.children, up.commands, up.directory = {}, {}, None
    monkeypatch.setattr(up, "_spawn", lambda name, argv, paths, env=None: started.__setitem__(name, (argv, env)))
    monkeypatch.setattr(up, "_wait_ready", lambda *a: None)
    hub_port, api_port = fixed_ports(site)
    fixed = variant(site, workspace={"hub_port": hub_port})
    HubPaths.of(fixed).prepare()
    up.proxy_command = PROXY
    up._start_all(fixed, HubPaths.of(fixed))

    # `up` picks the services' ports free; the units fix them: the same commands on `up`'s ports
    chosen = next(a for a in started["hub"][0] if a.startswith("--separate-services=")).split("=", 1)[1]
    ports = {name: int(port) for name, port in (item.split(":") for item in chosen.split(","))}
    made = units(fixed, PROXY, service_ports=ports)
    pairs = [("proxy", PROXY_UNIT), ("hub", HUB_UNIT), *((f"service-{n}", service_unit(n)) for n in SERVICES)]
    for name, unit_name in pairs:
        text = made[unit_name]
        exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
        assert shlex.split(exec_start.removeprefix("ExecStart=")) == started[name][0], name
    assert started["proxy"][1] == {"CONFIGPROXY_AUTH_TOKEN": HubPaths.of(fixed).secret("proxy_token")}
    assert started["hub"][1] is None and all(started[f"service-{n}"][1] is None for n in SERVICES)
    assert f"--proxy-api-port={api_port}" in started["hub"][0] and f"--hub-port={hub_port}" in started["hub"][0]


def test_the_docker_spawner_gets_an_engine_unit_whose_steps_run_the_engine(site, world_tmp):
    """With the docker spawner the hub requires the container engine's unit; what systemd would run for it (the
    step before, the API service, the step after, and after it stops the last step), run here in that order,
    gives an engine that answers and holds the single-user image, and leaves no mount behind."""
    docker = variant(site, workspace={"spawner": "docker"})
    unit_dir = world_tmp / "units"
    written = write_units(docker, PROXY, unit_dir)
    assert ENGINE_UNIT in {p.name for p in written}
    verify(written, unit_dir)
    hub, target, engine = (read_unit(unit_dir / n) for n in (HUB_UNIT, TARGET, ENGINE_UNIT))
    assert ENGINE_UNIT in hub["Unit"]["Requires"].split() and ENGINE_UNIT in hub["Unit"]["After"].split()
    assert ENGINE_UNIT in target["Unit"]["Wants"].split() and engine["Unit"]["Before"] == HUB_UNIT
    e = engine["Service"]
    assert e["User"] == "root" and e["Delegate"] == "yes" and e["Restart"] == "on-failure"
    # the local spawner's units have no engine
    assert ENGINE_UNIT not in units(site, PROXY) and ENGINE_UNIT not in units(site, PROXY)[HUB_UNIT]

    key, value = e["Environment"].split("=", 1)
    env = {"PATH": os.environ["PATH"], key: value}
    prepared = subprocess.run(shlex.split(e["ExecStartPre"]), env=env, capture_output=True, text=True, timeout=60)
    assert prepared.returncode == 0, prepared.stderr
    log = open(world_tmp / "engine.log", "wb")  # noqa: SIM115 - the engine's output, read on failure
    proc = subprocess.Popen(shlex.split(e["ExecStart"]), env=env, stdout=log, stderr=subprocess.STDOUT)
    built = Engine(docker.state_dir)
    try:
        ready = subprocess.run(shlex.split(e["ExecStartPost"]), env=env, capture_output=True, text=True, timeout=300)
        assert ready.returncode == 0, ready.stderr + (world_tmp / "engine.log").read_text()[-2000:]
        assert built.ping() and built.has_image(image_tag())
        assert f"made the image {image_tag()}" in ready.stdout
    finally:
        proc.terminate()  # the engine this test started, by its handle
        proc.wait(30)
        log.close()
    released = subprocess.run(shlex.split(e["ExecStopPost"]), env=env, capture_output=True, text=True, timeout=60)
    assert released.returncode == 0, released.stderr
    assert built.mounts() == []


def test_the_proxy_units_command_runs_with_its_environment_file(site, world_tmp):
    # what systemd would do for paitient-proxy.service: its ExecStart with the variables of its EnvironmentFile
    write_units(site, PROXY, world_tmp / "units")
    service = read_unit(world_tmp / "units" / PROXY_UNIT)["Service"]
    env = dict(line.split("=", 1) for line in Path(service["EnvironmentFile"]).read_text().splitlines())
    proc = subprocess.Popen(
        shlex.split(service["ExecStart"]),
        env={"PATH": os.environ["PATH"], **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{site.workspace.proxy_api_port}/api/routes",
            headers={"Authorization": f"token {env['CONFIGPROXY_AUTH_TOKEN']}"},
        )
        deadline, routes = time.monotonic() + 20, None
        while routes is None and time.monotonic() < deadline:
            assert proc.poll() is None, "the proxy exited at start"
            try:
                with urllib.request.urlopen(request, timeout=2) as r:  # noqa: S310 - loopback
                    routes = json.loads(r.read())
            except OSError:
                time.sleep(0.2)
        assert routes is not None and "/" in routes  # its default target, the hub
    finally:
        proc.terminate()  # the proxy this test started, by its handle
        proc.wait(10)


def test_a_low_public_port_gives_the_proxy_only_the_capability_to_bind_it(site):
    low = variant(site, workspace={"port": 443})
    text = units(low, PROXY)[PROXY_UNIT]
    assert (
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n" in text and "AmbientCapabilities=CAP_NET_BIND_SERVICE\n" in text
    )


def test_install_refuses_a_demo_or_a_state_in_a_private_tmp(site):
    demo = variant(site, directory={"url": ""})
    with pytest.raises(InstallError, match="names no \\[directory\\] url"):
        units(demo, PROXY)
    with pytest.raises(InstallError, match="needs a site configuration file"):
        units(parse(tomllib.loads(Path(site.source).read_text())), PROXY)
    in_tmp = variant(site, workspace={"state_dir": "/tmp/paitient"})
    with pytest.raises(InstallError, match="PrivateTmp"):
        units(in_tmp, PROXY)


def test_dry_run_prints_the_units_and_writes_nothing(site, world_tmp):
    import sys

    out = subprocess.run(
        [
            sys.executable, "-m", "paitient.cli", "install", f"--site={site.source}", "--dry-run",
            f"--unit-dir={world_tmp / 'units'}",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"# --- {PROXY_UNIT}" in out.stdout and f"# --- {HUB_UNIT}" in out.stdout
    assert not (world_tmp / "units").exists() and not (site.state_dir / "hub" / "proxy.env").exists()
