"""The pods KubeSpawner makes from the profile: who they run as, what they may do, what they mount, what they
carry. Rendered by KubeSpawner itself (``get_pod_manifest``) for real hub users, without a cluster."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy.engine import make_url
from traitlets.config import Config

from paitient import config as site_config
from paitient.hub.kubernetes import (
    CONFIG_CONTAINER,
    KERNELS_CONTAINER,
    NOTEBOOK_CONTAINER,
    SERVICE_PORTS,
    ProfileError,
    configure_kubernetes,
    literal,
    user_uid,
)
from paitient.hub.paths import server_argv
from tests.kubernetes.conftest import DIRECTORY_PASSWORD, PROJECTS, containers, spawner_for

IMAGE = "paitient-singleuser:0.1.0"
GIDS = {"oncology": 30001, "cardiometabolic": 30002, "genomics": 30003}
COOKIE_SECRET = "c0ffee" * 8
PROXY_TOKEN = "proxy-token-5d1e"
SERVICE_TOKENS = {name: f"service-token-{name}-91b2" for name in SERVICE_PORTS}


def profile(site: site_config.SiteConfig, image: str = IMAGE) -> Config:
    """The hub's configuration as the chart and the profile leave it (the chart's service tokens included)."""
    c = Config()
    c.JupyterHub.cookie_secret = bytes.fromhex(COOKIE_SECRET)
    c.ConfigurableHTTPProxy.auth_token = PROXY_TOKEN
    c.JupyterHub.services = [{"name": n, "api_token": t} for n, t in SERVICE_TOKENS.items()]
    configure_kubernetes(c, site, image=image)
    c.PaitientKubeSpawner.project_gids = GIDS
    return c


def all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod["spec"]["containers"], *(pod["spec"].get("initContainers") or [])]


async def test_every_container_runs_as_the_users_own_uid_never_root(site, make_user, render):
    c = profile(site)
    alice, bob = make_user("alice", ("oncology",)), make_user("bob", ("cardiometabolic",))
    uids = {}
    for user in (alice, bob):
        pod = await render(user, c)
        uid = site.accounts.uid_min + user.id
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["securityContext"]["runAsUser"] == uid
        assert pod["spec"]["securityContext"]["fsGroup"] == uid
        for container in all_containers(pod):
            ctx = container["securityContext"]
            assert ctx["runAsNonRoot"] is True, container["name"]
            assert ctx["runAsUser"] == uid != 0, container["name"]
            assert ctx["runAsGroup"] == uid, container["name"]
        uids[user.name] = uid
    assert uids["alice"] != uids["bob"]


async def test_no_container_can_gain_a_privilege(site, make_user, render):
    pod = await render(make_user("alice", ("oncology",)), profile(site))
    assert [c["name"] for c in all_containers(pod)] == [NOTEBOOK_CONTAINER, KERNELS_CONTAINER, CONFIG_CONTAINER]
    for container in all_containers(pod):
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False, container["name"]
        assert ctx["privileged"] is False, container["name"]
        assert ctx["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert ctx["readOnlyRootFilesystem"] is True, container["name"]


async def test_seccomp_is_the_runtimes_default_except_where_bubblewrap_runs(site, make_user, render):
    """The server's container and the pod keep RuntimeDefault. The kernels' container is the one exception, and
    only by what bubblewrap needs: namespaces (no seccomp or AppArmor of the runtime's), a /proc it may mount
    again (unmasked, which Kubernetes allows only in a pod with a user namespace of its own)."""
    pod = await render(make_user("alice", ("oncology",)), profile(site))
    spec, by_name = pod["spec"], containers(pod)
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    notebook = by_name[NOTEBOOK_CONTAINER]["securityContext"]
    assert notebook["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "procMount" not in notebook and "appArmorProfile" not in notebook
    kernels = by_name[KERNELS_CONTAINER]["securityContext"]
    assert kernels["seccompProfile"] == {"type": "Unconfined"}
    assert kernels["appArmorProfile"] == {"type": "Unconfined"}
    assert kernels["procMount"] == "Unmasked"
    assert spec["hostUsers"] is False


def data_claims(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        v["persistentVolumeClaim"]["claimName"]: v
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"].startswith("paitient-data-")
    }


def data_mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container.get("volumeMounts") or [] if m["mountPath"].startswith("/data")}


@pytest.mark.parametrize(
    ("projects", "expected"),
    [
        (("oncology",), ("oncology",)),
        (("cardiometabolic", "oncology"), ("cardiometabolic", "oncology")),
        (("genomics", "finance"), ("genomics",)),  # a hub group that is no project of the site mounts nothing
        ((), ()),
    ],
)
async def test_the_data_are_exactly_the_users_projects_read_only(site, make_user, render, projects, expected):
    pod = await render(make_user("carol", projects), profile(site))
    claims = data_claims(pod)
    assert sorted(claims) == [f"paitient-data-{p}" for p in sorted(expected)]
    for claim in claims.values():
        assert claim["persistentVolumeClaim"]["readOnly"] is True
    by_name = containers(pod)
    mounts = data_mounts(by_name[KERNELS_CONTAINER])
    assert sorted(mounts) == [f"/data/{p}" for p in sorted(expected)]
    for path, mount in mounts.items():
        assert mount["readOnly"] is True, path
        assert mount["name"] == f"data-{path.removeprefix('/data/')}"
    # the server reads no dataset, its own projects' included
    assert data_mounts(by_name[NOTEBOOK_CONTAINER]) == {}
    # no other project appears anywhere in the pod: not as a claim, a mount, a group or a word
    text = json.dumps(pod)
    for other in set(PROJECTS) - set(expected):
        assert other not in text, other
    assert pod["spec"]["securityContext"].get("supplementalGroups", []) == sorted(GIDS[p] for p in expected)


async def test_the_home_is_the_users_own_claim_in_both_containers(site, make_user, render):
    pod = await render(make_user("alice", ("oncology",)), profile(site))
    homes = [v for v in pod["spec"]["volumes"] if v["name"] == "home"]
    assert homes == [{"name": "home", "persistentVolumeClaim": {"claimName": "paitient-home-alice"}}]
    for container in pod["spec"]["containers"]:
        assert {"name": "home", "mountPath": "/home/researcher"} in container["volumeMounts"]
    # the container that writes the server's configuration does not see the home: nothing there decides it
    (init,) = pod["spec"]["initContainers"]
    assert not [m for m in init["volumeMounts"] if m["name"] == "home" or m["mountPath"].startswith("/home")]


async def test_both_containers_run_the_profiles_image(site, make_user, render):
    pod = await render(make_user("alice", ("oncology",)), profile(site))
    assert {c["name"]: c["image"] for c in all_containers(pod)} == {
        NOTEBOOK_CONTAINER: IMAGE,
        KERNELS_CONTAINER: IMAGE,
        CONFIG_CONTAINER: IMAGE,
    }
    assert containers(pod)[NOTEBOOK_CONTAINER]["args"] == server_argv("python")


async def test_the_kernels_container_runs_the_pod_launcher_with_the_pods_paths_and_the_sites_limits(
    site_file, make_user, render
):
    """The image's entrypoint stays (no ``command``): the launcher is its argument, as the server is the
    notebook's. Its options are the mounts the pod has and the site's [sandbox] limits."""
    site_file.write_text(
        site_file.read_text() + "\n[sandbox]\nmemory_mb = 2048\ncpu_seconds = 600\nkernels_per_account = 3\n"
    )
    site = site_config.load(site_file)
    pod = await render(make_user("alice", ("oncology",)), profile(site))
    kernels = containers(pod)[KERNELS_CONTAINER]
    assert "command" not in kernels or kernels["command"] is None
    assert kernels["args"] == [
        "python",
        "-I",
        "-m",
        "paitient.services.launcher.pod",
        "--socket=/run/paitient/launcher.sock",
        "--home=/home/researcher",
        "--data-root=/data",
        "--run-dir=/run/paitient/services",
        "--memory-mb=2048",
        "--max-processes=256",
        "--max-open-files=1024",
        "--cpu-seconds=600",
        f"--tmp-bytes={site.sandbox.tmp_bytes}",
        "--kernels-per-account=3",
        "--gateway=paitient-services:8090",
        "--token-file=/run/paitient-token/token",
        "--gateway-ca=/etc/paitient-gateway-ca/ca.crt",
        f"--airlock-max-bytes={site.airlock.max_bytes}",
    ]
    # what the options name is what the container mounts: the home, the sockets' folder, the data
    paths = {m["mountPath"]: m for m in kernels["volumeMounts"]}
    assert {"/home/researcher", "/run/paitient", "/data/oncology"} <= set(paths)
    assert paths["/data/oncology"]["readOnly"] is True
    # the server reaches the launcher's socket (the same folder), not the data
    notebook = {m["mountPath"] for m in containers(pod)[NOTEBOOK_CONTAINER]["volumeMounts"]}
    assert "/run/paitient" in notebook and not any(p.startswith("/data") for p in notebook)
    # the launcher's options are the ones it takes: its own parser reads them
    from paitient.services.launcher.pod import PodLauncherApp

    app = PodLauncherApp()
    app.parse_command_line(kernels["args"][4:])
    assert (app.socket, app.home, app.data_root, app.run_dir) == (
        "/run/paitient/launcher.sock",
        "/home/researcher",
        "/data",
        "/run/paitient/services",
    )
    assert (app.memory_mb, app.cpu_seconds, app.tmp_bytes, app.kernels_per_account) == (
        2048,
        600,
        site.sandbox.tmp_bytes,
        3,
    )
    assert (app.gateway, app.token_file) == ("paitient-services:8090", "/run/paitient-token/token")
    # the relay calls the gateway over TLS, trusting the authority the kernels container (only) mounts
    assert (app.gateway_ca, app.plain_tcp) == ("/etc/paitient-gateway-ca/ca.crt", False)
    ca_mount = paths["/etc/paitient-gateway-ca"]
    assert ca_mount == {"name": "gateway-ca", "mountPath": "/etc/paitient-gateway-ca", "readOnly": True}
    (ca,) = [v for v in pod["spec"]["volumes"] if v["name"] == "gateway-ca"]
    assert ca["configMap"] == {"name": "paitient-gateway-ca", "defaultMode": 0o444}


async def test_the_pods_token_is_mounted_in_the_kernels_container_only_outside_every_sandbox(site, make_user, render):
    """The relay (in the launcher's process) reads the pod's token from its Secret; the server's container and
    the init container do not mount it, and it lies in nothing a kernel's sandbox binds."""
    from paitient.services.relay import check_token_file

    pod = await render(make_user("alice", ("oncology",)), profile(site))
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "pod-token"]
    assert volume["secret"] == {"secretName": "paitient-pod-token-alice", "defaultMode": 0o440}
    by_name = containers(pod)
    (mount,) = [m for m in by_name[KERNELS_CONTAINER]["volumeMounts"] if m["name"] == "pod-token"]
    assert mount == {"name": "pod-token", "mountPath": "/run/paitient-token", "readOnly": True}
    others = [*pod["spec"]["initContainers"], by_name[NOTEBOOK_CONTAINER]]
    assert not [m for c in others for m in c["volumeMounts"] if m["name"] == "pod-token"]
    check_token_file("/run/paitient-token/token", {"home": "/home/researcher", "data": "/data", "run": "/run/paitient"})


async def test_the_pod_carries_no_secret_but_the_servers_own_token(site, make_user, render, postgres_server):
    c = profile(site)
    # an operator's environment for users that would change how Python loads code is dropped
    c.KubeSpawner.environment = {"PYTHONPATH": "/home/researcher/evil", "LD_PRELOAD": "/home/researcher/x.so"}
    pod = await render(make_user("alice", ("oncology",)), c, api_token="alices-server-token")
    text = json.dumps(pod)
    for secret in (COOKIE_SECRET, PROXY_TOKEN, DIRECTORY_PASSWORD, postgres_server.password, *SERVICE_TOKENS.values()):
        assert secret not in text
    # nor where the hub's database is, or the file that holds its password
    assert site.database.url not in text and site.database.passfile not in text
    by_name = containers(pod)
    notebook = {e["name"]: e.get("value") for e in by_name[NOTEBOOK_CONTAINER]["env"]}
    assert notebook["JUPYTERHUB_API_TOKEN"] == "alices-server-token"
    assert "PYTHONPATH" not in notebook and "LD_PRELOAD" not in notebook
    assert not [e for e in by_name[NOTEBOOK_CONTAINER]["env"] if "valueFrom" in e]
    kernels = {e["name"]: e.get("value") for e in by_name[KERNELS_CONTAINER]["env"]}
    assert not [name for name in kernels if "TOKEN" in name or name.startswith("JUPYTERHUB")]
    assert "alices-server-token" not in json.dumps(by_name[KERNELS_CONTAINER])
    # no Kubernetes credential and no other service's address in the pod
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["spec"]["enableServiceLinks"] is False


async def test_the_servers_token_carries_only_what_a_server_needs(site, make_user):

    spawner = spawner_for(make_user("alice", ("oncology",)), profile(site))
    assert sorted(spawner.server_token_scopes) == ["access:servers!server", "users:activity!user"]


async def test_without_a_kernel_launcher_no_pod_is_made(site, make_user, render):
    c = profile(site)
    c.PaitientKubeSpawner.kernels_cmd = []
    with pytest.raises(ProfileError, match="kernels_cmd is empty.*paitient.services.launcher.pod"):
        await render(make_user("alice", ("oncology",)), c)


def test_an_argument_reaches_the_container_as_the_hub_wrote_it_or_not_at_all():
    """KubeSpawner's templates would eat braces and Kubernetes would expand $(NAME) in a container's args."""
    assert literal('{"a":"{username}"}').format(username="alice") == '{"a":"{username}"}'
    with pytest.raises(ProfileError, match="Kubernetes would expand"):
        literal('{"a":"$(HOME)"}')


def test_a_uid_beyond_the_accounts_range_is_refused(site_file):
    site = site_config.load(site_file, overrides={"accounts": {"max_accounts": 3}})
    assert user_uid(site, 2) == site.accounts.uid_min + 2
    with pytest.raises(ProfileError, match="max_accounts"):
        user_uid(site, 3)


def test_the_profile_needs_a_database_the_hub_and_the_services_share(site_file):
    """SQLite files on a pod's own disk would be lost with the pod and unseen by the services' pod."""
    site = site_config.load(site_file, overrides={"database": {"url": "", "passfile": ""}})
    assert site.directory.url  # the directory is there: the database is what is missing
    c = Config()
    with pytest.raises(ProfileError, match=r'needs \[database\] url.*passfile = "/etc/paitient/database/pgpass"'):
        configure_kubernetes(c, site, image=IMAGE)
    assert "db_url" not in c.JupyterHub


def test_the_profile_refuses_subdomains_it_cannot_route(site_file):
    """The chart's proxy routes by path: a hub naming hosts in its routes would reach no server."""
    site = site_config.load(site_file, overrides={"workspace": {"subdomain_host": "https://paitient.example.org"}})
    c = Config()
    with pytest.raises(ProfileError, match=r"leave \[workspace\] subdomain_host empty there"):
        configure_kubernetes(c, site, image=IMAGE)
    assert "subdomain_host" not in c.JupyterHub


def test_the_hubs_database_is_the_sites(site, hub_database):
    c = configure_kubernetes(Config(), site, image=IMAGE)
    url = make_url(c.JupyterHub.db_url)
    assert url.drivername == "postgresql+psycopg"
    assert url.database == make_url(hub_database.url).database
    assert url.query["passfile"] == hub_database.passfile
    assert "search_path=hub" in url.query["options"]


def test_the_profile_needs_the_hospitals_directory():
    c = Config()
    with pytest.raises(ProfileError, match=r"\[directory\] url"):
        configure_kubernetes(c, site_config.load(None), image=IMAGE)


async def test_a_start_with_options_is_refused_and_a_charts_profile_list_is_set_aside(site, make_user, render):
    """Attack (a review's): the hub's API takes a dict of options with a start and keeps them; KubeSpawner
    applies them through a profile list (image, volumes, resources) once the chart's values name one. A
    start with any option is refused with a 400 saying why, and a profile list from the chart is cleared."""
    from tornado import web

    from paitient.hub.hubconfig import NO_OPTIONS_MESSAGE

    c = Config()
    c.KubeSpawner.profile_list = [{"display_name": "big", "kubespawner_override": {"image": "someone/else:latest"}}]
    c.PaitientKubeSpawner.profile_list = c.KubeSpawner.profile_list
    c.merge(profile(site))
    alice = make_user("alice", ("oncology",))
    spawner = spawner_for(alice, c)
    assert spawner.profile_list == []
    with pytest.raises(web.HTTPError) as e:
        await spawner._run_apply_user_options({"profile": "big", "image": "someone/else:latest"})
    assert e.value.status_code == 400 and e.value.log_message == NO_OPTIONS_MESSAGE
    await spawner._run_apply_user_options({})  # JupyterLab's start sends none: it starts
    pod = await render(alice, c)
    assert {container["image"] for container in all_containers(pod)} == {IMAGE}
