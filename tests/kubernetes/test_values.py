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
from traitlets.config import Config

from paitient.hub.kubernetes import SERVICE_PORTS, ProfileError
from tests.kubernetes.conftest import containers

VALUES = Path(__file__).resolve().parents[2] / "hub_config" / "kubernetes" / "values.yaml"


def values() -> dict[str, Any]:
    return yaml.safe_load(VALUES.read_text())


def get_config(key: str, default: Any = None) -> Any:
    """z2jh's get_config: a dotted path into the values."""
    node: Any = values()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def chart_config(site_file: Path) -> Config:
    """What the chart's jupyterhub_config.py leaves: hub.services with tokens, then hub.extraConfig run."""
    c = Config()
    c.JupyterHub.services = [
        {"name": name, "api_token": f"chart-token-{name}", **spec} for name, spec in get_config("hub.services").items()
    ]
    old = os.environ.get("PAITIENT_SITE")
    os.environ["PAITIENT_SITE"] = str(site_file)
    try:
        for name, code in values()["hub"]["extraConfig"].items():
            exec(compile(code, f"hub.extraConfig.{name}", "exec"), {"c": c, "get_config": get_config})  # noqa: S102
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
        assert "command" not in services[name]  # they run in their own pod, not in the hub's
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
