"""The Kubernetes profile: each researcher's server in a pod of its own, through KubeSpawner.

On one machine the hub (root) makes a system account per user and the root-side launcher starts every
kernel in bubblewrap. On Kubernetes the hub cannot make accounts on the nodes or start processes in a pod,
so the decisions move into the pod's manifest, which the hub writes and nobody in the pod can change:

- **who**: the pod runs as a uid of the user's own (``[accounts] uid_min`` + the hub's id of the user),
  never root, with the groups of the user's projects (:attr:`PaitientKubeSpawner.project_gids`);
- **which data**: one read-only volume per project the user is a member of, mounted under
  ``/data/<project>``, and no other project's;
- **which network**: NetworkPolicies (:func:`network_policies`) let the pod reach the hub's API and the
  services and nothing else, and let only the proxy and the hub reach the pod;
- **how the kernel is kept**: the server (container ``notebook``) runs under the container runtime's
  default seccomp filter with a read-only root and no data volume at all; its kernels run in the
  container ``kernels`` (same pod, same uid, its own mount and pid namespaces), which holds the data
  volumes and starts every kernel in bubblewrap as on a host: no network, its own pid namespace, the
  workspace's seccomp filter. bubblewrap needs user namespaces and a /proc it can mount again, so that one
  container runs without the runtime's seccomp filter and AppArmor profile, with an unmasked /proc, in a
  pod with a user namespace of its own (``hostUsers: false``); it still has no capability and no
  privilege escalation. ``docs/kubernetes.md`` explains the choice;
- **the server's policy**: an init container (``server-config``, same uid, the server's restrictions) writes
  the server's Jupyter configuration, which the hub renders from the site and the user into its arguments,
  into a volume the server's container mounts read-only and the kernels' container not at all
  (:mod:`paitient.hub.podconfig`); nothing in the home is read for policy, as on a host.

The pure part (:func:`pod_plan`, :func:`network_policies`, :func:`service_entries`) turns the site and a
user into plain data; :class:`PaitientKubeSpawner` and :func:`configure_kubernetes` are the thin wrappers
that hand it to KubeSpawner and to the hub.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubespawner import KubeSpawner
from traitlets import Dict, Int, List, Unicode, default
from traitlets.config import Config

from paitient import podtokens
from paitient.config import SiteConfig
from paitient.fsutil import locked
from paitient.hub import podconfig
from paitient.hub.paths import server_argv
from paitient.hub.serverconfig import user_server_env
from paitient.hub.spawner import SERVER_TOKEN_SCOPES, SiteSpawnerMixin
from paitient.registry import Member, Registry
from paitient.services import gateway, relay
from paitient.services.launcher import pod as launcher

NOTEBOOK_CONTAINER = "notebook"
"""KubeSpawner's name for the pod's main container: the user's Jupyter server."""
KERNELS_CONTAINER = "kernels"
CONFIG_CONTAINER = "server-config"
"""The init container that writes the server's configuration (:mod:`paitient.hub.podconfig`)."""
HOME = launcher.HOME
DATA = launcher.DATA
RUNTIME_SOCKETS = launcher.SOCKETS
"""An in-memory folder both containers mount: the kernel launcher's socket (and none of the kernels)."""

CHART_LABELS = {"app": "jupyterhub"}
"""The Zero to JupyterHub chart's labels (``jupyterhub.matchLabels`` less the release): pods are picked by
these and ``component``."""
SINGLEUSER = "singleuser-server"
HUB = "hub"
PROXY = "proxy"
SERVICES = "paitient-services"
"""The Service that names the root-side services (ledger, audit, airlock, egress, jobs) and their gateway:
containers of the hub's pod (:mod:`paitient.hub.kubeservices`), the host users' pods' relays call."""

SERVICE_PORTS = {"airlock": 8410, "ledger": 8411, "audit": 8412, "egress": 8413, "jobs": 8414}
"""Where each service's pages listen in the hub's pod; the proxy routes browsers there."""
GATEWAY_PORT = gateway.PORT
"""The services' gateway in the hub's pod: the port users' pods reach there besides the hub's API (their
relays' calls)."""
GATEWAY_CA = "paitient-gateway-ca"
"""The ConfigMap with the certificate authority (key ``ca.crt``) of the gateway's TLS certificate; the kernels
container mounts it for the relay (a public certificate: no Secret needed)."""
GATEWAY_CA_FOLDER = "/etc/paitient-gateway-ca"
GATEWAY_CA_FILE = f"{GATEWAY_CA_FOLDER}/ca.crt"
TOKEN_FOLDER = os.path.dirname(relay.TOKEN_FILE)
"""Where the kernels container (only) mounts the pod's token, the Secret :func:`token_secret_name`."""
HUB_API_PORT = 8081
NOTEBOOK_PORT = 8888
DATABASE_PASSFILE = "/etc/paitient/database/pgpass"
"""Where ``hub_config/kubernetes/values.yaml`` mounts the database's password file (the Secret
``paitient-database``, key ``pgpass``, 0400) in the hub's container: the site's ``[database] passfile``."""


class ProfileError(ValueError):
    """The Kubernetes profile cannot make a pod for this user; the message says what to fix."""


def user_uid(site: SiteConfig, hub_user_id: int) -> int:
    """The uid of a user's pod: ``[accounts] uid_min`` plus the hub's (stable) id of the user."""
    uid = site.accounts.uid_min + hub_user_id
    if hub_user_id < 0 or uid > site.accounts.uid_max:
        raise ProfileError(
            f"hub user id {hub_user_id} gives uid {uid}, outside [accounts] uid_min..uid_max "
            f"({site.accounts.uid_min}..{site.accounts.uid_max}); raise [accounts] max_accounts"
        )
    return uid


def register_pod_user(
    site: SiteConfig, username: str, uid: int, *, projects: tuple[str, ...], roles: tuple[str, ...], account: str
) -> Member:
    """The user's entry in the services' registry (``<state_dir>/accounts.json``), as a host's account makes it
    (:func:`paitient.hub.accounts.ensure_account`): the services know a pod's caller by the uid its token names,
    and look its projects and roles up there. ``account`` names the pod (a pod's uid has no system account).
    :class:`ProfileError` when the registry gives the user another uid, or the uid to another user (the hub's
    user ids changed: a new hub database), rather than hand one user's records and budgets to another."""
    registry = Registry.for_state_dir(site.state_dir)
    registry.path.parent.mkdir(parents=True, exist_ok=True)
    with locked(site.state_dir / "accounts.create.lock"):
        known = registry.by_username(username)
        if known is not None and known.uid != uid:
            raise ProfileError(
                f"the registry {registry.path} gives {username[:40]!r} uid {known.uid}, the hub's id for the user "
                f"gives uid {uid}: the hub's user ids changed (a new hub database?). The user's files and budgets "
                "belong to the registry's uid: restore the hub database, or remove the user's registry entry"
            )
        holder = registry.by_uid(uid)
        if holder is not None and holder.username != username:
            raise ProfileError(
                f"uid {uid} belongs to {holder.username[:40]!r} in the registry {registry.path}, not to "
                f"{username[:40]!r}: the hub's user ids changed (a new hub database?); restore it, or remove the "
                "other user's registry entry once their files and budget are settled"
            )
        member = Member(username, account, uid, projects=projects, roles=roles, updated=time.time())
        registry.put(member)
    return member


def dropped() -> dict[str, Any]:
    """What every container of a user's pod gives up: privilege escalation and every capability."""
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
    }


def notebook_context(uid: int, gid: int) -> dict[str, Any]:
    """The server's container: non-root, the runtime's default seccomp filter, a read-only root."""
    return {
        **dropped(),
        "runAsUser": uid,
        "runAsGroup": gid,
        "readOnlyRootFilesystem": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def bubblewrap_needs() -> dict[str, Any]:
    """What a container that starts bubblewrap needs of its security context: bubblewrap makes namespaces and
    mounts /proc again, which the runtime's default seccomp filter and AppArmor profile forbid and a masked
    /proc refuses. What runs inside gets the workspace's own filter (:mod:`paitient.rules.seccomp`) from
    bubblewrap."""
    return {
        "seccompProfile": {"type": "Unconfined"},
        "appArmorProfile": {"type": "Unconfined"},
        "procMount": "Unmasked",
    }


def kernels_context(uid: int, gid: int) -> dict[str, Any]:
    """The kernels' container: non-root, bubblewrap's needs (:func:`bubblewrap_needs`), a read-only root."""
    return {**dropped(), "runAsUser": uid, "runAsGroup": gid, "readOnlyRootFilesystem": True, **bubblewrap_needs()}


@dataclass(frozen=True)
class PodPlan:
    """What the hub decides about one user's pod."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    projects: tuple[str, ...]
    volumes: tuple[dict[str, Any], ...]
    notebook_mounts: tuple[dict[str, Any], ...]
    kernels_mounts: tuple[dict[str, Any], ...]
    config_mounts: tuple[dict[str, Any], ...]


def data_volume_name(project: str) -> str:
    return f"data-{project}"


def pod_plan(
    site: SiteConfig,
    hub_user_id: int,
    projects: tuple[str, ...],
    *,
    data_claim_prefix: str,
    project_gids: dict[str, int],
    home_claim: str,
    token_secret: str = "",
) -> PodPlan:
    """The user's pod: uid, groups, and volumes (the home, one read-only claim per project of the user's).

    Projects the site does not list are left out; so are the data of every other project. The data are
    mounted into the kernels' container only: the server reads no dataset, as on a host. The server's
    configuration volume is written by the init container and mounted read-only by the server's container
    only; the server's own files (``server-state``) are the server's container's alone.
    """
    known = {p.name for p in site.projects}
    mine = tuple(sorted(p for p in set(projects) if p in known))
    uid = user_uid(site, hub_user_id)
    volumes: list[dict[str, Any]] = [
        {"name": "home", "persistentVolumeClaim": {"claimName": home_claim}},
        {"name": "sockets", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": "server-config", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {"name": "server-state", "emptyDir": {"sizeLimit": "100Mi"}},
        # the pod's token for the services' gateway: the pod's group may read it (0440), the relay does;
        # only the kernels container mounts it, outside everything a kernel's sandbox binds
        {"name": "pod-token", "secret": {"secretName": token_secret, "defaultMode": 0o440}},
        # the authority the relay trusts for the gateway's certificate
        {"name": "gateway-ca", "configMap": {"name": GATEWAY_CA, "defaultMode": 0o444}},
    ]
    shared = [
        {"name": "home", "mountPath": HOME},
        {"name": "sockets", "mountPath": RUNTIME_SOCKETS},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - the pod's own, in an emptyDir
    ]
    data_mounts = []
    for project in mine:
        name = data_volume_name(project)
        volumes.append(
            {"name": name, "persistentVolumeClaim": {"claimName": f"{data_claim_prefix}{project}", "readOnly": True}}
        )
        data_mounts.append({"name": name, "mountPath": f"{DATA}/{project}", "readOnly": True})
    return PodPlan(
        uid=uid,
        gid=uid,
        groups=tuple(sorted({project_gids[p] for p in mine if p in project_gids})),
        projects=mine,
        volumes=tuple(volumes),
        notebook_mounts=(
            *shared,
            {"name": "server-config", "mountPath": podconfig.JUPYTER, "readOnly": True},
            {"name": "server-state", "mountPath": podconfig.STATE},
        ),
        kernels_mounts=(
            *shared,
            *data_mounts,
            {"name": "pod-token", "mountPath": TOKEN_FOLDER, "readOnly": True},
            {"name": "gateway-ca", "mountPath": GATEWAY_CA_FOLDER, "readOnly": True},
        ),
        config_mounts=(
            {"name": "server-config", "mountPath": podconfig.JUPYTER},
            {"name": "server-state", "mountPath": podconfig.STATE},
        ),
    )


def launcher_options(site: SiteConfig, services_host: str = SERVICES) -> list[str]:
    """The pod launcher's arguments (:mod:`paitient.services.launcher.pod`): where the pod mounts things, the
    site's kernel limits, and the relay's gateway and token (the launcher runs the pod's relay). They are in
    the manifest, which nobody in the pod can change."""
    s = site.sandbox
    return [
        f"--socket={launcher.SOCKET}",
        f"--home={HOME}",
        f"--data-root={DATA}",
        f"--run-dir={launcher.RUN_DIR}",
        f"--memory-mb={s.memory_mb}",
        f"--max-processes={s.max_processes}",
        f"--max-open-files={s.max_open_files}",
        f"--cpu-seconds={s.cpu_seconds}",
        f"--tmp-bytes={s.tmp_bytes}",
        f"--kernels-per-account={s.kernels_per_account}",
        f"--gateway={services_host}:{GATEWAY_PORT}",
        f"--token-file={relay.TOKEN_FILE}",
        f"--gateway-ca={GATEWAY_CA_FILE}",
        f"--airlock-max-bytes={site.airlock.max_bytes}",
    ]


def kernels_env() -> dict[str, str]:
    """The kernels' container's whole environment: where things are, and no credential at all."""
    return {
        "HOME": HOME,
        "PAITIENT_DATA_DIR": DATA,
        "PAITIENT_LAUNCHER_SOCKET": launcher.SOCKET,
        "PYTHONNOUSERSITE": "1",
        "LANG": "C.UTF-8",
    }


def token_secret_manifest(name: str, token: str, namespace: str) -> dict[str, Any]:
    """The Secret that carries a pod's token to its kernels container (key ``token``)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {**CHART_LABELS, "component": "paitient-pod-token"},
        },
        "type": "Opaque",
        "stringData": {"token": token},
    }


def literal(text: str) -> str:
    """``text`` as KubeSpawner's templates (``str.format``) leave it unchanged. Kubernetes itself would replace
    ``$(NAME)`` in a container's arguments with a variable of its environment: such text is refused."""
    if "$(" in text:
        raise ProfileError(f"a container argument holds '$(', which Kubernetes would expand: {text[:200]!r}")
    return text.replace("{", "{{").replace("}", "}}")


def config_env() -> dict[str, str]:
    """The init container's whole environment: no home, no credential."""
    return {"PYTHONNOUSERSITE": "1", "LANG": "C.UTF-8"}


# -- the network ----------------------------------------------------------------------------------


def _pods(component: str) -> dict[str, Any]:
    return {"podSelector": {"matchLabels": {**CHART_LABELS, "component": component}}}


def network_policies(*, dns: bool = True) -> list[dict[str, Any]]:
    """The NetworkPolicies of the profile (they replace the chart's own for users' pods).

    Users' pods: ingress from the proxy and the hub to the server's port only; egress to the hub's pod on
    the hub's API and the services' gateway, and (``dns``) to the cluster's DNS in ``kube-system``, nothing
    else: no internet, no other pod, no cloud metadata. The hub's pod, where the services run
    (:mod:`paitient.hub.kubeservices`): ingress from the proxy and the hub on the services' pages and from
    users' pods on the gateway's port, beside what the chart's own policy for the hub lets in (its API);
    the pod's egress stays the chart's.
    """
    service_ports = [{"port": port, "protocol": "TCP"} for port in sorted(SERVICE_PORTS.values())]
    gateway_port = [{"port": GATEWAY_PORT, "protocol": "TCP"}]
    user_egress: list[dict[str, Any]] = [
        {"to": [_pods(HUB)], "ports": [{"port": HUB_API_PORT, "protocol": "TCP"}, *gateway_port]},
    ]
    if dns:
        user_egress.append(
            {
                "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}],
                "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
            }
        )
    users = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "paitient-singleuser"},
        "spec": {
            "podSelector": {"matchLabels": {**CHART_LABELS, "component": SINGLEUSER}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {"from": [_pods(PROXY), _pods(HUB)], "ports": [{"port": NOTEBOOK_PORT, "protocol": "TCP"}]},
            ],
            "egress": user_egress,
        },
    }
    services = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "paitient-services"},
        "spec": {
            "podSelector": {"matchLabels": {**CHART_LABELS, "component": HUB}},
            "policyTypes": ["Ingress"],
            "ingress": [
                # the services' pages: the proxy routes researchers' and stewards' browsers to them, the hub
                # checks their tokens
                {"from": [_pods(PROXY), _pods(HUB)], "ports": service_ports},
                {"from": [_pods(SINGLEUSER)], "ports": gateway_port},
            ],
        },
    }
    return [users, services]


def service_manifest() -> dict[str, Any]:
    """The Service ``paitient-services``: the gateway's port and the pages' ports of the hub's pod, the host
    name users' pods' relays call (and the gateway's certificate names) and the hub routes the pages to."""
    ports = [{"name": "gateway", "port": GATEWAY_PORT, "targetPort": GATEWAY_PORT, "protocol": "TCP"}]
    ports += [
        {"name": f"pages-{name}", "port": port, "targetPort": port, "protocol": "TCP"}
        for name, port in sorted(SERVICE_PORTS.items())
    ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": SERVICES, "labels": {**CHART_LABELS, "component": SERVICES}},
        "spec": {"type": "ClusterIP", "selector": {**CHART_LABELS, "component": HUB}, "ports": ports},
    }


def manifests_yaml() -> str:
    """``hub_config/kubernetes/networkpolicies.yaml``: the policies and the Service ``paitient-services``, as
    ``kubectl apply -f`` takes them."""
    import yaml

    header = (
        "# Generated by `python -m paitient.hub.kubernetes` from paitient.hub.kubernetes.network_policies and\n"
        "# service_manifest; a test fails when this file is stale.\n"
        "# Apply with: kubectl apply -n <namespace> -f networkpolicies.yaml\n"
    )
    return header + yaml.safe_dump_all(
        [*network_policies(), service_manifest()], sort_keys=False, default_flow_style=False
    )


# -- the services as hub services -------------------------------------------------------------------


def service_entries(services_host: str) -> list[dict[str, Any]]:
    """``JupyterHub.services`` for services that run in their own pod: a URL each, no command. Their
    tokens come from the chart (``hub.services.<name>.apiToken``), never from this function."""
    import importlib

    from paitient.services import PAGES
    from paitient.services import SERVICES as MODULES

    entries = []
    for name, port in SERVICE_PORTS.items():
        module = importlib.import_module(MODULES[name])
        entries.append(
            {
                "name": name,
                "url": f"http://{services_host}:{port}",
                "oauth_no_confirm": True,
                "oauth_client_allowed_scopes": sorted(module.custom_scopes()),
                "display": name in PAGES,
            }
        )
    return entries


# -- the spawner ------------------------------------------------------------------------------------


class PaitientKubeSpawner(SiteSpawnerMixin, KubeSpawner):
    """KubeSpawner with the pod the hub decides from the site configuration and the user's projects."""

    data_claim_prefix = Unicode(
        "paitient-data-",
        help="Each project's data are the PersistentVolumeClaim <prefix><project> (ReadOnlyMany), holding "
        "<dataset>/current as ingest publishes it.",
    ).tag(config=True)

    project_gids = Dict(
        key_trait=Unicode(),
        value_trait=Int(),
        help="Project -> the group id that may read its data volume's files; the pod gets the groups of the "
        "user's projects only.",
    ).tag(config=True)

    kernels_cmd = List(
        Unicode(),
        help="The command of the pod's kernels container: the in-pod kernel launcher "
        "(python -I -m paitient.services.launcher.pod), which starts each kernel the server asks for in "
        "bubblewrap. The profile adds its options (the pod's paths, the site's limits) as the container's "
        "arguments after it; the image's entrypoint (tini) stays PID 1 and reaps. Empty: no pod is made.",
    ).tag(config=True)

    services_host = Unicode(
        SERVICES, help="The services pod's host name; the pod's relay calls the services' gateway there."
    ).tag(config=True)

    token_secret_template = Unicode(
        "paitient-pod-token-{user_server}",
        help="The Secret that holds a user's pod token (key 'token'), which the hub writes before each start "
        "of the pod and deletes after it stops; the kernels container mounts it.",
    ).tag(config=True)

    @property
    def token_secret(self) -> str:
        return self._expand_user_properties(self.token_secret_template)

    def register(self) -> Member:
        """The user's entry in the services' registry: the pod's uid, the user's projects and roles now."""
        projects, roles = self.member_groups()
        return register_pod_user(
            self.site,
            self.user.name,
            user_uid(self.site, int(self.user.id)),
            projects=projects,
            roles=roles,
            account=self.pod_name,
        )

    async def start(self) -> Any:
        """Record the user in the services' registry, mint the pod's token (its hash into the hub's token file)
        and write it into the pod's Secret, then start the pod. Not run on a cluster yet (docs/kubernetes.md)."""
        await asyncio.to_thread(self.register)
        token, _ = podtokens.mint(
            podtokens.token_file(self.site.state_dir),
            self.user.name,
            user_uid(self.site, int(self.user.id)),
            group=self.site.workspace.gateway_uid or None,
        )
        await self._put_token_secret(token_secret_manifest(self.token_secret, token, self.namespace))
        return await super().start()

    async def stop(self, now: bool = False) -> None:
        """Stop the pod, then revoke its token and delete its Secret: its relay's calls are refused from now."""
        try:
            await super().stop(now=now)
        finally:
            podtokens.revoke(
                podtokens.token_file(self.site.state_dir),
                self.user.name,
                group=self.site.workspace.gateway_uid or None,
            )
            await self._drop_token_secret()

    async def _put_token_secret(self, body: dict[str, Any]) -> None:
        from kubernetes_asyncio.client.rest import ApiException

        try:
            await self.api.create_namespaced_secret(self.namespace, body)
        except ApiException as e:
            if e.status != 409:
                raise
            await self.api.replace_namespaced_secret(self.token_secret, self.namespace, body)

    async def _drop_token_secret(self) -> None:
        from kubernetes_asyncio.client.rest import ApiException

        try:
            await self.api.delete_namespaced_secret(self.token_secret, self.namespace)
        except ApiException as e:
            if e.status != 404:
                raise

    @default("kernels_cmd")
    def _kernels_cmd_default(self) -> list[str]:
        return launcher.launcher_argv("python")

    @default("default_url")
    def _default_url_default(self) -> str:
        return "/lab"

    @default("server_token_scopes")
    def _server_token_scopes_default(self) -> list[str]:
        return list(SERVER_TOKEN_SCOPES)

    @default("automount_service_account_token")
    def _no_kubernetes_token(self) -> bool:
        return False

    @default("pvc_name_template")
    def _home_claim(self) -> str:
        return "paitient-home-{user_server}"

    def plan(self) -> PodPlan:
        projects, _ = self.member_groups()
        return pod_plan(
            self.site,
            int(self.user.id),
            projects,
            data_claim_prefix=self.data_claim_prefix,
            project_gids=dict(self.project_gids),
            home_claim=self.pvc_name,
            token_secret=self.token_secret,
        )

    async def get_pod_manifest(self):
        if not self.kernels_cmd:
            raise ProfileError(
                "PaitientKubeSpawner.kernels_cmd is empty: the pod would have no kernel launcher; set it (or "
                "custom.paitient.kernelsCmd) to the in-pod launcher, python -I -m paitient.services.launcher.pod "
                "(docs/kubernetes.md)"
            )
        p = self.plan()
        self.uid, self.gid, self.fs_gid = p.uid, p.gid, p.gid
        self.supplemental_gids = list(p.groups)
        self.container_security_context = notebook_context(p.uid, p.gid)
        self.pod_security_context = {
            "runAsNonRoot": True,
            "runAsUser": p.uid,
            "runAsGroup": p.gid,
            "fsGroup": p.gid,
            "supplementalGroups": list(p.groups),
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        self.allow_privilege_escalation = False
        self.privileged = False
        self.volumes = list(p.volumes)
        self.volume_mounts = list(p.notebook_mounts)
        self.working_dir = HOME
        self.extra_containers = [
            {
                "name": KERNELS_CONTAINER,
                "image": self.image,
                "imagePullPolicy": self.image_pull_policy,
                # as args, like the server's command: the image's entrypoint (tini) is PID 1 of the container,
                # forwards SIGTERM and reaps a sandbox whose keeper was killed
                "args": [*self.kernels_cmd, *launcher_options(self.site, self.services_host)],
                "env": [{"name": k, "value": v} for k, v in sorted(kernels_env().items())],
                "volumeMounts": list(p.kernels_mounts),
                "securityContext": kernels_context(p.uid, p.gid),
                "workingDir": HOME,
            }
        ]
        self.init_containers = [
            {
                "name": CONFIG_CONTAINER,
                "image": self.image,
                "imagePullPolicy": self.image_pull_policy,
                # KubeSpawner fills {username}-style templates into every string of a container; the
                # configuration's JSON braces are escaped so that it comes out as the hub rendered it
                "args": [
                    literal(arg)
                    for arg in podconfig.pod_config_argv("python", podconfig.pod_server_config(self.site, p.projects))
                ],
                "env": [{"name": k, "value": v} for k, v in sorted(config_env().items())],
                "volumeMounts": list(p.config_mounts),
                "securityContext": notebook_context(p.uid, p.gid),
            }
        ]
        self.extra_pod_config = {**self.extra_pod_config, "hostUsers": False, "enableServiceLinks": False}
        return await super().get_pod_manifest()

    def get_env(self) -> dict[str, str]:
        env = super().get_env()
        for var in (
            "PYTHONPATH",
            "PYTHONSTARTUP",
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "PYTHONHOME",
            "JUPYTER_PATH",
            "JUPYTER_CONFIG_PATH",
        ):
            env.pop(var, None)
        env.update(HOME=HOME, PYTHONNOUSERSITE="1", PAITIENT_LAUNCHER_SOCKET=launcher.SOCKET)
        # the configuration the init container wrote, read-only (JUPYTER_CONFIG_DIR, JUPYTER_DATA_DIR)
        env.update(user_server_env(podconfig.CONFIG_DIR, podconfig.DATA_DIR, HOME))
        return env


def configure_kubernetes(
    c: Config,
    site: SiteConfig,
    *,
    image: str,
    services_host: str = SERVICES,
    kernels_cmd: list[str] | None = None,
    storage_capacity: str = "10Gi",
    state_dir: str | None = None,
    data_root: str | None = None,
    gateway_uid: int | None = None,
) -> Config:
    """The hub settings of the profile, on top of :func:`paitient.hub.auth.configure_from_site`'s sign-in.

    Zero to JupyterHub's ``hub.extraConfig`` calls this (``hub_config/kubernetes/values.yaml``). The site must
    name a PostgreSQL database (``[database] url``); the hub's schema in it is made here when missing, so the
    database must be reachable when the hub starts. ``state_dir``, ``data_root`` and ``gateway_uid``: what the
    values gave the services' containers (``custom.paitient.stateDir``, ``dataRoot`` (empty: ``<stateDir>/data``)
    and ``gatewayUid``), which the site must say too.
    """
    from paitient.hub import landing, tokens
    from paitient.hub.auth import configure_from_site
    from paitient.hub.hubconfig import (
        RESEARCHER_SCOPES,
        STEWARD_SCOPES,
        hub_db_url,
        managed_services,
        refuse_user_options,
    )
    from paitient.hub.signon import OWN_SCOPES

    if not site.directory.url:
        raise ProfileError("the Kubernetes profile needs [directory] url: there is no embedded directory in a cluster")
    if site.workspace.subdomain_host:
        # the chart's proxy routes by path only; a hub that names hosts in its routes would reach no server
        raise ProfileError(
            "the Kubernetes profile does not give each server and service an origin of its own yet: leave "
            "[workspace] subdomain_host empty there (docs/security-model.md, 17b, says what one origin allows)"
        )
    if not site.database.url:
        raise ProfileError(
            "the Kubernetes profile needs [database] url: without it the hub and the services keep their state in "
            "SQLite files on a pod's own disk, lost when the pod moves and not shared between the hub and the "
            'services\' pod. Set [database] url = "postgresql://USER@HOST[:PORT]/DATABASE" and passfile = '
            f'"{DATABASE_PASSFILE}" (the Secret paitient-database; docs/kubernetes.md)'
        )
    if state_dir is not None and Path(state_dir) != site.state_dir:
        raise ProfileError(
            f"the values mount the state claim at {state_dir} (custom.paitient.stateDir), the site's [workspace] "
            f"state_dir is {site.state_dir}: the hub would keep the pods' tokens and the registry where the "
            "services do not look. Make the two the same, then `python -m paitient.hub.kubeservices values.yaml`"
        )
    if state_dir is not None and Path(data_root or Path(state_dir) / "data") != site.data_root:
        raise ProfileError(
            f"the values mount the projects' data at {data_root or Path(state_dir) / 'data'} in the services "
            f"(custom.paitient.dataRoot), the site's data root is {site.data_root}: the airlock, the egress service "
            "and the jobs would find no dataset. Make the two the same, then `python -m paitient.hub.kubeservices "
            "values.yaml`"
        )
    if gateway_uid is not None and gateway_uid != site.workspace.gateway_uid:
        raise ProfileError(
            f"the values run the gateway as uid {gateway_uid} (custom.paitient.gatewayUid), the site's [workspace] "
            f"gateway_uid is {site.workspace.gateway_uid or 'not set'}: the services would refuse every call the "
            "gateway makes. Make the two the same, then `python -m paitient.hub.kubeservices values.yaml`"
        )
    configure_from_site(c, site)
    # the hub's tables in the schema "hub" of the site's database (made here when missing), as on a host
    c.JupyterHub.db_url = hub_db_url(site)
    c.Authenticator.manage_groups = True
    c.Authenticator.manage_roles = True
    c.Authenticator.reset_managed_roles_on_startup = True
    c.Authenticator.auto_login = False
    c.PaitientLDAPAuthenticator.researcher_scopes = RESEARCHER_SCOPES
    c.PaitientLDAPAuthenticator.steward_scopes = STEWARD_SCOPES
    c.JupyterHub.default_url = landing.default_url
    c.JupyterHub.redirect_to_server = True
    c.JupyterHub.template_paths = [str(tokens.TEMPLATES)]
    c.JupyterHub.template_vars = {"paitient_offers_tokens": tokens.offers_tokens}
    c.JupyterHub.spawner_class = "paitient.hub.kubernetes.PaitientKubeSpawner"
    c.JupyterHub.allow_named_servers = False
    c.Spawner.apply_user_options = refuse_user_options
    c.Spawner.site_file = site.source
    c.Spawner.site_state_dir = str(site.state_dir)
    k = c.PaitientKubeSpawner
    k.profile_list = []  # a chart's profileList would let a start choose its image, volumes and resources
    k.image = image
    k.image_pull_policy = "IfNotPresent"
    k.cmd = server_argv("python")
    k.port = NOTEBOOK_PORT
    k.storage_pvc_ensure = True
    k.storage_capacity = storage_capacity
    k.storage_access_modes = ["ReadWriteOnce"]
    k.services_host = services_host
    if kernels_cmd is not None:
        k.kernels_cmd = list(kernels_cmd)

    # The chart has put hub.services (with the tokens it keeps in its Secret) into JupyterHub.services:
    # each of ours keeps its token and gets its URL and scopes here.
    chart = {s["name"]: s for s in (c.JupyterHub.services if "services" in c.JupyterHub else [])}
    services = [s for name, s in chart.items() if name not in SERVICE_PORTS]
    services += [{**chart.get(e["name"], {}), **e} for e in service_entries(services_host)]
    c.JupyterHub.services = services
    scopes = dict(c.JupyterHub.custom_scopes) if "custom_scopes" in c.JupyterHub else {}
    for module in managed_services(site):
        scopes.update(module.custom_scopes())
    c.JupyterHub.custom_scopes = scopes
    roles = list(c.JupyterHub.load_roles) if "load_roles" in c.JupyterHub else []
    c.JupyterHub.load_roles = [r for r in roles if r.get("name") != "user"] + [
        {"name": "user", "scopes": list(OWN_SCOPES)}
    ]
    return c


if __name__ == "__main__":
    print(manifests_yaml(), end="")
