"""The docker spawner's pure parts: what a container is asked for, the image's layer, the engine's files.

The engine itself, the hub and the servers are tried in ``test_container.py``; here nothing runs.
"""

from __future__ import annotations

import io
import tarfile
import tomllib
from pathlib import Path

import pytest

import paitient
from paitient.config import ConfigError, load
from paitient.config.site import SiteConfig
from paitient.hub.container import (
    LOCKED_SETTINGS,
    Bind,
    ContainerPlan,
    PaitientDockerSpawner,
    account_files,
    container_binds,
    container_spec,
)
from paitient.hub.engine import CONTAINERS_CONF, Engine, base_layer, image_tag
from paitient.hub.paths import server_argv
from paitient.ops.commands import hub_command


def site_at(tmp_path: Path, text: str = "") -> SiteConfig:
    f = tmp_path / "site.toml"
    f.write_text(f'[workspace]\nstate_dir = "{tmp_path / "state"}"\n{text}')
    return load(str(f))


@pytest.mark.parametrize(("value", "entry_point"), [("docker", "paitient-docker"), ("local", "paitient-local")])
def test_the_site_names_a_spawner_by_its_short_name(tmp_path, value, entry_point):
    site = site_at(tmp_path, f'spawner = "{value}"\n')
    assert site.workspace.spawner == entry_point
    assert f"--spawner={entry_point}" in hub_command(site, directory_url="ldap://x", hub_port=1, proxy_api_port=2).argv


def test_an_unknown_spawner_is_refused_with_the_choices(tmp_path):
    with pytest.raises(ConfigError) as e:
        site_at(tmp_path, 'spawner = "kubernetes"\n')
    assert "spawner" in str(e.value) and "'docker'" in str(e.value) and "'paitient-local'" in str(e.value)


def test_the_container_holds_no_data_and_sees_only_its_binds(tmp_path):
    site = site_at(tmp_path)
    user_dir = site.state_dir / "users" / "pt-alice"
    binds = container_binds(site, "/home/pt-alice", user_dir, ("/opt/venv", "/src/paitient"))
    writable = {b.source for b in binds if b.writable}
    assert writable == {"/home/pt-alice", str(user_dir / "state")}
    sources = {b.source for b in binds}
    assert {"/usr", "/opt/venv", "/src/paitient", str(site.run_dir), str(site.state_dir / "gate")} <= sources
    assert {str(user_dir / "config"), str(user_dir / "data")} <= sources
    assert {b.target: b.source for b in binds if b.target.startswith("/etc/")} == {
        "/etc/passwd": str(user_dir / "etc" / "passwd"),
        "/etc/group": str(user_dir / "etc" / "group"),
        **({"/etc/localtime": "/etc/localtime"} if Path("/etc/localtime").exists() else {}),
    }
    # no dataset, no other part of the state directory, nothing else of the host's /etc
    assert not any(s == str(site.data_root) or s.startswith(str(site.data_root) + "/") for s in sources)
    assert not any(s in (str(site.state_dir), "/etc", "/", "/home") for s in sources)
    assert all(b.target == b.source for b in binds if not b.target.startswith("/etc/"))


def plan(**kw) -> ContainerPlan:
    values = dict(
        name="paitient-alice",
        image=image_tag(),
        command=server_argv("/opt/venv/bin/python"),
        env={"HOME": "/home/pt-alice"},
        uid=20000,
        gid=20000,
        groups=(999,),
        home="/home/pt-alice",
        binds=(Bind("/usr"), Bind("/home/pt-alice", writable=True)),
        netns="/proc/4242/ns/net",
        log_path="/var/lib/paitient/logs/server-pt-alice.log",
        labels={"org.paitient.account": "pt-alice"},
    )
    values.update(kw)
    return ContainerPlan(**values)


def test_the_container_runs_as_the_account_without_privileges_in_the_held_namespace():
    create, host = container_spec(plan())
    assert create["user"] == "20000:20000" and host["group_add"] == ["999"]
    assert host["cap_drop"] == ["ALL"] and "cap_add" not in host
    assert host["security_opt"] == ["no-new-privileges"] and host["read_only"] is True
    assert host["network_mode"] == "ns:/proc/4242/ns/net" and host["pid_mode"] == "host"
    assert "privileged" not in host and "port_bindings" not in host and "devices" not in host
    assert host["binds"] == {
        "/home/pt-alice": {"bind": "/home/pt-alice", "mode": "rw"},
        "/usr": {"bind": "/usr", "mode": "ro"},
    }


def test_limits_pass_through_when_set():
    _, host = container_spec(plan(mem_limit=2 << 30, cpu_quota=150_000))
    assert host["mem_limit"] == 2 << 30 and (host["cpu_period"], host["cpu_quota"]) == (100_000, 150_000)
    _, host = container_spec(plan())
    assert "mem_limit" not in host and "cpu_quota" not in host


def test_the_containers_account_files_name_the_account_and_the_workspace_group_only():
    passwd, group = account_files("pt-alice", 20000, 0, "/home/pt-alice", 0)
    assert [line.split(":")[0] for line in passwd.splitlines()] == ["root", "pt-alice"]
    assert "pt-alice:x:20000:0::/home/pt-alice:/usr/sbin/nologin" in passwd.splitlines()
    assert len(group.splitlines()) == 3 and group.splitlines()[-1].endswith(":0:pt-alice")


@pytest.mark.parametrize("setting", [*LOCKED_SETTINGS, "allowed_images"])
def test_settings_that_would_widen_the_container_are_refused(setting):
    value = {"volumes": {"/data": "/data"}, "read_only_volumes": {"/data": "/data"}, "links": {"a": "b"}}.get(
        setting, ["x"] if setting in ("mounts", "allowed_images") else {"privileged": True}
    )
    spawner = PaitientDockerSpawner(**{setting: value})
    with pytest.raises(RuntimeError, match=setting):
        spawner.check_settings()
    PaitientDockerSpawner().check_settings()  # the defaults pass


def test_the_image_layer_is_folders_and_links_only():
    with tarfile.open(fileobj=io.BytesIO(base_layer())) as tar:
        members = tar.getmembers()
    assert all(m.isdir() or m.issym() for m in members)
    assert {m.name: m.linkname for m in members if m.issym()} == {
        "bin": "usr/bin",
        "sbin": "usr/sbin",
        "lib": "usr/lib",
        "lib64": "usr/lib64",
    }
    assert image_tag() == f"localhost/paitient-singleuser:{paitient.__version__}"


def test_the_engines_files_stay_under_the_state_directory(tmp_path):
    engine = Engine(tmp_path / "state")
    conf = tomllib.loads(CONTAINERS_CONF.format(dir=engine.dir))
    assert conf["engine"]["runtime"] == "runc"
    assert "nofile=20000:20000" in conf["containers"]["default_ulimits"]
    assert conf["network"]["network_config_dir"].startswith(str(engine.dir))
    argv = engine.service_command()
    assert argv[:1] == ["podman"] and argv[-4:] == ["system", "service", "--time=0", f"unix://{engine.socket}"]
    for flag in ("--root", "--runroot", "--tmpdir"):
        assert argv[argv.index(flag) + 1].startswith(str(engine.dir) + "/")
