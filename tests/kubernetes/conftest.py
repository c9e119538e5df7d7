"""The Kubernetes profile without a cluster: a site, real JupyterHub users, and KubeSpawner's own rendering.

KubeSpawner loads a kubeconfig when it is made; the one here names a cluster at 127.0.0.1:1 that nothing
contacts (the tests render manifests only, which needs no API call).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyterhub import orm
from jupyterhub.objects import Hub
from jupyterhub.user import User
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.config import kube_config
from traitlets.config import Config

from paitient import config as site_config
from paitient.hub.kubernetes import PaitientKubeSpawner
from tests.postgres import Database, database_toml

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:1"}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
users: [{name: none, user: {token: not-used}}]
"""

DIRECTORY_PASSWORD = "directory-service-password-7f3a"

SITE = """\
[workspace]
state_dir = "{state}"
gateway_uid = 60090

[directory]
url = "ldaps://ad.hospital.example/"
lookup_dn = true
search_base = "ou=Staff,dc=hospital,dc=example"
user_attribute = "sAMAccountName"
service_dn = "cn=svc-paitient,ou=Service Accounts,dc=hospital,dc=example"
service_password_file = "{password}"
group_base = "ou=Groups,dc=hospital,dc=example"
steward_group = "Data Stewards"

[[projects]]
name = "oncology"
group = "oncology"
datasets = ["breast_cancer", "gbsg2"]
stewards = ["sam", "tina"]

[[projects]]
name = "cardiometabolic"
group = "cardiometabolic"
datasets = ["diabetes"]
stewards = ["sam", "tina"]

[[projects]]
name = "genomics"
group = "genomics"
datasets = ["variants"]
stewards = ["sam", "tina"]
"""

PROJECTS = ("oncology", "cardiometabolic", "genomics")


@pytest.fixture(scope="session", autouse=True)
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """kubernetes_asyncio read ``KUBECONFIG`` when it was imported: its default location is set here."""
    path = tmp_path_factory.mktemp("kube") / "config"
    path.write_text(KUBECONFIG)
    old = kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(path)
    yield
    kube_config.KUBE_CONFIG_DEFAULT_LOCATION = old


@pytest.fixture(scope="session")
def hub_database(postgres_server: Any) -> Database:
    """The PostgreSQL database the sites of these tests name (the profile requires one): the session's real
    server; each hub configuration makes (or finds) its schema ``hub`` there."""
    return postgres_server.database()


@pytest.fixture
def site_file(tmp_path: Path, hub_database: Database) -> Path:
    """A hospital's site file (root's, as the loader wants) with three projects, an AD service account and the
    PostgreSQL database the hub and the services share."""
    password = tmp_path / "directory-password"
    password.write_text(DIRECTORY_PASSWORD + "\n")
    password.chmod(0o600)
    path = tmp_path / "site.toml"
    path.write_text(SITE.format(state=tmp_path / "state", password=password) + database_toml(hub_database.site_table()))
    path.chmod(0o644)
    return path


@pytest.fixture
def site(site_file: Path) -> site_config.SiteConfig:
    return site_config.load(site_file)


@pytest.fixture
def hub_db() -> Iterator[Any]:
    db = orm.new_session_factory("sqlite://")()
    for name in PROJECTS:
        db.add(orm.Group(name=name))
    db.commit()
    yield db
    db.close()


@pytest.fixture
def make_user(hub_db: Any) -> Callable[..., User]:
    """A real hub user (JupyterHub's ``User`` over its ORM row) in the given projects (JupyterHub groups, as
    the authenticator's ``manage_groups`` leaves them)."""

    def make(name: str, projects: tuple[str, ...] = ()) -> User:
        row = orm.User(name=name)
        hub_db.add(row)
        for project in projects:
            row.groups.append(orm.Group.find(hub_db, project) or orm.Group(name=project))
        hub_db.commit()
        return User(row, settings={}, db=hub_db)

    return make


@pytest.fixture
def render(site_file: Path) -> Callable[..., Any]:
    """``await render(user, config)``: the pod KubeSpawner would create for ``user``, as the dict the API gets."""

    async def run(user: User, config: Config, *, api_token: str = "server-own-token") -> dict[str, Any]:  # noqa: S107
        spawner = spawner_for(user, config)
        spawner.api_token = api_token
        pod = await spawner.get_pod_manifest()
        return ApiClient().sanitize_for_serialization(pod)

    return run


def spawner_for(user: User, config: Config) -> PaitientKubeSpawner:
    return PaitientKubeSpawner(user=user, hub=Hub(), config=config)


def containers(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod["spec"]["containers"]}
