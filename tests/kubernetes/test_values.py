"""The Zero to JupyterHub values file: it parses, and what it tells the chart agrees with the profile.

The chart reads values with ``z2jh.get_config`` and runs ``hub.extraConfig`` in its jupyterhub_config.py;
the test does the same with the values file's own text.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url
from traitlets.config import Config

from paitient import config as site_config
from paitient.hub.kubernetes import DATABASE_PASSFILE, SERVICE_PORTS, ProfileError
from tests.kubernetes.conftest import containers
from tests.postgres import database_toml

VALUES = Path(__file__).resolve().parents[2] / "hub_config" / "kubernetes" / "values.yaml"


def values() -> dict[str, Any]:
    return yaml.safe_load(VALUES.read_text())


def get_config(key: str, default: Any = None, *, within: dict[str, Any] | None = None) -> Any:
    """z2jh's get_config: a dotted path into the values (``within``: other values than the file's)."""
    node: Any = values() if within is None else within
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def chart_config(site_file: Path, *, state_dir: str | None = None) -> Config:
    """What the chart's jupyterhub_config.py leaves: hub.services with tokens, then hub.extraConfig run. The
    values' ``custom.paitient.stateDir`` is the test site's state directory (``state_dir``: another), as an
    operator makes the two the same."""
    c = Config()
    c.JupyterHub.services = [
        {"name": name, "api_token": f"chart-token-{name}", **spec} for name, spec in get_config("hub.services").items()
    ]
    given = values()
    given["custom"]["paitient"]["stateDir"] = state_dir or str(site_config.load(site_file).state_dir)

    def chart_get_config(key: str, default: Any = None) -> Any:
        return get_config(key, default, within=given)

    old = os.environ.get("PAITIENT_SITE")
    os.environ["PAITIENT_SITE"] = str(site_file)
    try:
        for name, code in given["hub"]["extraConfig"].items():
            exec(compile(code, f"hub.extraConfig.{name}", "exec"), {"c": c, "get_config": chart_get_config})  # noqa: S102
    finally:
        if old is None:
            os.environ.pop("PAITIENT_SITE")
        else:
            os.environ["PAITIENT_SITE"] = old
    return c


def test_the_values_file_parses_and_turns_off_what_the_profile_replaces():
    v = values()
    single = v["singleuser"]
    assert single["networkPolicy"]["enabled"] is False  # the profile's policies instead
    assert single["cloudMetadata"]["blockWithIptables"] is False  # no privileged init container
    assert single["storage"]["type"] == "none"  # the profile's home claim instead
    assert single["uid"] is None and single["fsGid"] is None  # the profile's uid per user
    assert single["allowPrivilegeEscalation"] is False
    hub = v["hub"]["containerSecurityContext"]
    assert hub["allowPrivilegeEscalation"] is False and hub["capabilities"] == {"drop": ["ALL"]}


def test_the_hub_services_are_the_profiles(site_file):
    assert set(get_config("hub.services")) == set(SERVICE_PORTS)
    c = chart_config(site_file)
    services = {s["name"]: s for s in c.JupyterHub.services}
    host = get_config("custom.paitient.servicesHost")
    for name, port in SERVICE_PORTS.items():
        assert services[name]["url"] == f"http://{host}:{port}"
        assert services[name]["api_token"] == f"chart-token-{name}"  # the chart's token kept
        assert "command" not in services[name]  # their own containers run them, not the hub
    assert set(c.JupyterHub.custom_scopes) >= {"custom:airlock:review", "custom:audit:read"}


def test_extra_config_signs_in_through_the_profiles_ldap_authenticator(site_file):
    c = chart_config(site_file)
    assert c.JupyterHub.authenticator_class == "paitient-ldap"
    a = c.PaitientLDAPAuthenticator
    assert a.server_address == "ad.hospital.example"
    assert a.lookup_dn is True and a.user_attribute == "sAMAccountName"
    assert a.project_groups == {"oncology": "oncology", "cardiometabolic": "cardiometabolic", "genomics": "genomics"}
    assert c.JupyterHub.spawner_class == "paitient.hub.kubernetes.PaitientKubeSpawner"


async def test_values_that_empty_the_launcher_make_no_pod(site_file, make_user, render):
    c = chart_config(site_file)
    c.PaitientKubeSpawner.kernels_cmd = []
    with pytest.raises(ProfileError, match="kernels_cmd is empty"):
        await render(make_user("alice", ("oncology",)), c)


async def test_the_values_settings_reach_the_pod(site_file, make_user, render):
    c = chart_config(site_file)
    image = f"{get_config('singleuser.image.name')}:{get_config('singleuser.image.tag')}"
    assert c.PaitientKubeSpawner.image == image
    assert c.PaitientKubeSpawner.project_gids == get_config("custom.paitient.projectGids")
    # the values name the in-pod launcher: the hub makes the pod, and its kernels container runs it
    assert get_config("custom.paitient.kernelsCmd") == ["python", "-I", "-m", "paitient.services.launcher.pod"]
    pod = await render(make_user("bob", ("oncology",)), c)
    assert {x["image"] for x in containers(pod).values()} == {image}
    assert containers(pod)["kernels"]["args"][:4] == get_config("custom.paitient.kernelsCmd")
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert f"{get_config('custom.paitient.dataClaimPrefix')}oncology" in claims
    assert pod["spec"]["securityContext"]["supplementalGroups"] == [get_config("custom.paitient.projectGids.oncology")]


def secret_volume(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The hub's volume ``name`` and its mount, as the values give them."""
    (volume,) = [v for v in get_config("hub.extraVolumes") if v["name"] == name]
    (mount,) = [m for m in get_config("hub.extraVolumeMounts") if m["name"] == name]
    return volume, mount


def test_the_hub_mounts_the_databases_password_file_as_it_mounts_the_directorys():
    volume, mount = secret_volume("paitient-database")
    assert volume["secret"] == {"secretName": "paitient-database", "defaultMode": 0o400}
    assert mount == {"name": "paitient-database", "mountPath": os.path.dirname(DATABASE_PASSFILE), "readOnly": True}
    assert os.path.basename(DATABASE_PASSFILE) == "pgpass"  # the Secret's key
    directory, _ = secret_volume("paitient-directory")
    assert directory["secret"]["defaultMode"] == volume["secret"]["defaultMode"]
    # the hub's database is the site's: the chart makes no SQLite volume and names no URL of its own
    assert get_config("hub.db.type") == "other" and get_config("hub.db.url") is None


def site_with_passfile(site_file: Path, url: str, passfile: str) -> Path:
    text = site_file.read_text().split("[database]")[0]
    site_file.write_text(text + database_toml({"url": url, "passfile": passfile}))
    return site_file


def kubelet_secret(folder: Path, key: str, content: str) -> Path:
    """A Secret volume as the kubelet lays it out (a timestamped folder, ``..data`` linking to it, each key a
    link through ``..data``), owned by root with the values' ``defaultMode`` 0400. Returns the key's path."""
    stamped = folder / "..2026_12_04_20_00_00.000000001"
    stamped.mkdir(parents=True)
    (stamped / key).write_text(content)
    (stamped / key).chmod(0o400)
    (folder / "..data").symlink_to(stamped.name)
    (folder / key).symlink_to(f"..data/{key}")
    return folder / key


def test_a_site_whose_passfile_is_the_mounted_secret_is_the_hubs_database(site_file, postgres_db, tmp_path):
    """The site names the mounted Secret: the loader takes it, and the hub (the values' extraConfig) reads the
    password there. Where nothing is mounted (this machine) it says so; with the Secret's file at a folder
    standing for the mount, the hub's configuration reaches the database and makes the hub's schema."""
    from paitient.services.kit.db import DatabaseError

    site_with_passfile(site_file, postgres_db.url, DATABASE_PASSFILE)
    assert site_config.load(site_file).database.passfile == DATABASE_PASSFILE
    assert not os.path.exists(DATABASE_PASSFILE)
    with pytest.raises(DatabaseError, match=f"passfile {DATABASE_PASSFILE} does not exist"):
        chart_config(site_file)

    mounted = kubelet_secret(tmp_path / "mounted", "pgpass", Path(postgres_db.passfile).read_text())
    site_with_passfile(site_file, postgres_db.url, str(mounted))
    c = chart_config(site_file)
    url = make_url(c.JupyterHub.db_url)
    assert url.query["passfile"] == str(mounted) and "search_path=hub" in url.query["options"]
    import psycopg

    with psycopg.connect(postgres_db.url, passfile=str(mounted)) as conn:
        schemas = {row[0] for row in conn.execute("SELECT schema_name FROM information_schema.schemata")}
    assert "hub" in schemas


def test_values_with_a_site_without_a_database_make_no_hub(site_file):
    site_file.write_text(site_file.read_text().split("[database]")[0])
    with pytest.raises(ProfileError, match=r"needs \[database\] url"):
        chart_config(site_file)


def test_values_whose_state_dir_is_not_the_sites_make_no_hub(site_file):
    """The hub would keep the pods' tokens and the registry where the services' containers do not look."""
    with pytest.raises(ProfileError, match=r"custom\.paitient\.stateDir"):
        chart_config(site_file, state_dir="/var/lib/elsewhere")


def test_values_whose_gateway_uid_is_not_the_sites_make_no_hub(site_file):
    """The services take a named caller from the site's gateway_uid only: every call would be refused."""
    site_file.write_text(site_file.read_text().replace("gateway_uid = 60090", "gateway_uid = 60091"))
    with pytest.raises(ProfileError, match=r"custom\.paitient\.gatewayUid"):
        chart_config(site_file)


def test_values_whose_data_root_is_not_the_sites_make_no_hub(site_file, tmp_path):
    """The airlock, the egress service and the jobs would look for the projects' data where none is mounted."""
    elsewhere = tmp_path / "published"
    site_file.write_text(
        site_file.read_text().replace("gateway_uid = 60090", f'gateway_uid = 60090\ndata_root = "{elsewhere}"')
    )
    with pytest.raises(ProfileError, match=r"custom\.paitient\.dataRoot"):
        chart_config(site_file)
