"""The root-side services on Kubernetes: containers of the hub's pod, beside the hub.

Why the hub's pod. The hub writes what the services read under the site's state directory: the pods'
token hashes (:mod:`paitient.podtokens`) and the registry of members (:func:`~paitient.hub.kubernetes.
register_pod_user`). In one pod they share one ``ReadWriteOnce`` claim, ``paitient-state``, mounted at the
site's ``state_dir`` in every container that needs it, as on a host the hub and the services share the
disk: no ``ReadWriteMany`` storage, no copy of the tokens in a database the gateway would need credentials
for. The chart runs the hub's Deployment with the ``Recreate`` strategy, so no two pods ever hold the claim.

The containers (:meth:`ServicesPod.containers`; ``hub.extraContainers`` in
``hub_config/kubernetes/values.yaml``, which a test keeps equal to this module):

- ``ledger``, ``audit``, ``egress``: ``paitient service NAME --separate``, as root (the services' files are
  root's, as on a host) with no capability, no privilege escalation, the runtime's seccomp filter and a
  read-only root.
- ``airlock``, ``jobs``: the same, but with what starting their workers (the membership-inference audit,
  the training) as accounts of their own, made in the image, needs of root (:data:`WORKER_CAPABILITIES`) and
  bubblewrap's needs as the users' ``kernels`` containers have them (no seccomp or AppArmor profile of the
  runtime's, an unmasked ``/proc``; the pod in a user namespace of its own, ``hostUsers: false``).
- ``gateway``: :mod:`paitient.services.gateway` as ``[workspace] gateway_uid``, no capability, a read-only
  root; it reads the state (the token file) read-only and listens on the pod network with TLS.

Each service mounts its own API token only (a key of the chart's Secret ``hub``), the site file, the
database's password file, and, where it reads datasets (airlock, egress, jobs), each project's data claim
read-only. No container but the hub's mounts the hub's ServiceAccount token: an empty folder covers its
path, so a service, or a worker that escaped its sandbox into one, holds no credential for the Kubernetes
API. The services share the hub's network namespace and so its egress (the chart's hub policy: the
Kubernetes API, the directory, the database); the profile's policy ``paitient-services`` lets users' pods
reach the gateway's port and the proxy the pages' ports (:func:`~paitient.hub.kubernetes.network_policies`),
and the Service ``paitient-services`` (:func:`~paitient.hub.kubernetes.service_manifest`) names those ports
for them.

``python -m paitient.hub.kubeservices VALUES`` prints the hub's generated values for the site settings
named in ``custom.paitient`` of VALUES (after adding a project, say).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from paitient.hub.kubernetes import (
    DATABASE_PASSFILE,
    GATEWAY_PORT,
    HUB_API_PORT,
    SERVICE_PORTS,
    bubblewrap_needs,
    data_volume_name,
)

SITE_FILE = "/etc/paitient/site.toml"
DIRECTORY_FOLDER = "/etc/paitient/directory"
DATABASE_FOLDER = DATABASE_PASSFILE.rsplit("/", 1)[0]
SERVICE_TOKEN = "/etc/paitient/service-token"  # noqa: S105 - a path, not a secret
"""Where a service's container mounts its API token (one key of the chart's Secret ``hub``)."""
HUB_SECRET = "hub"  # noqa: S105 - a name, not a secret
"""The chart's Secret, which holds each of ``hub.services``' API tokens as ``hub.services.<name>.apiToken``."""
STATE_CLAIM = "paitient-state"
TLS_SECRET = "paitient-gateway-tls"  # noqa: S105 - a name, not a secret
TLS_SOURCE = "/etc/paitient-gateway-tls-source"
"""The Secret as mounted in the init container that copies the key for the gateway's uid (root 0400)."""
TLS_FOLDER = "/etc/paitient-gateway-tls"
"""The gateway's certificate and key, the key owned by the gateway's uid, 0400 (an in-memory folder)."""
SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount"  # noqa: S105 - a path
SANDBOXING = ("airlock", "jobs")
"""The services that start workers in bubblewrap as accounts of their own (the audit's, the runner's)."""
WORKER_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "KILL", "SETGID", "SETUID")
"""What a service that runs workers as another account needs of root: to start them as that account (SETUID,
SETGID), to hand them their scratch folder and take it back (CHOWN, FOWNER), to read what they wrote there
and remove it (DAC_OVERRIDE), and to stop them (KILL). Nothing that reaches beyond the container."""
READS_DATA = ("airlock", "egress", "jobs")
GATEWAY = "gateway"
PYTHON = ("python", "-I")


def _context(uid: int, *, add: tuple[str, ...] = (), bubblewrap: bool = False) -> dict[str, Any]:
    """A container's security context: ``uid`` (root, or not), no privilege escalation, a read-only root,
    no capability but ``add``; the runtime's seccomp filter unless it starts ``bubblewrap`` (then what the
    users' kernels containers have for it, :func:`~paitient.hub.kubernetes.bubblewrap_needs`)."""
    context: dict[str, Any] = {
        "runAsUser": uid,
        "runAsGroup": uid,
        "runAsNonRoot": uid != 0,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"], **({"add": list(add)} if add else {})},
    }
    return {**context, **(bubblewrap_needs() if bubblewrap else {"seccompProfile": {"type": "RuntimeDefault"}})}


def _env() -> list[dict[str, str]]:
    """Every container's whole environment: no credential, no setting of the hub's."""
    return [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "PYTHONNOUSERSITE", "value": "1"}]


def _no_api_token() -> dict[str, Any]:
    return {"name": "no-api-token", "mountPath": SERVICE_ACCOUNT_TOKEN, "readOnly": True}


@dataclass(frozen=True)
class ServicesPod:
    """The services and the gateway as containers of the hub's pod, for one site's settings."""

    image: str
    """The image of ``kernels/image/Containerfile``'s target ``services``: the ``singleuser`` image with the
    workers' accounts (``paitient-audit``, ``paitient-jobs``), run as root."""
    state_dir: str
    data_root: str
    gateway_uid: int
    projects: tuple[str, ...] = ()
    data_claim_prefix: str = "paitient-data-"
    service_ports: dict[str, int] = field(default_factory=lambda: dict(SERVICE_PORTS))

    def __post_init__(self) -> None:
        if self.gateway_uid <= 0:
            raise ValueError("the gateway needs [workspace] gateway_uid: a uid of its own, never root")

    # -- the volumes ---------------------------------------------------------------------------------

    def volumes(self) -> list[dict[str, Any]]:
        """``hub.extraVolumes``: the hub's own (site, directory, database) and the services'."""
        out: list[dict[str, Any]] = [
            {"name": "paitient-site", "configMap": {"name": "paitient-site"}},
            {"name": "paitient-directory", "secret": {"secretName": "paitient-directory", "defaultMode": 0o400}},
            {"name": "paitient-database", "secret": {"secretName": "paitient-database", "defaultMode": 0o400}},
            {"name": "paitient-state", "persistentVolumeClaim": {"claimName": STATE_CLAIM}},
            {
                "name": "paitient-service-tokens",
                "secret": {
                    "secretName": HUB_SECRET,
                    "defaultMode": 0o400,
                    "items": [
                        {"key": f"hub.services.{name}.apiToken", "path": name} for name in sorted(self.service_ports)
                    ],
                },
            },
            {"name": "paitient-gateway-tls-source", "secret": {"secretName": TLS_SECRET, "defaultMode": 0o400}},
            {"name": "paitient-gateway-tls", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
            {"name": "no-api-token", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        ]
        out += [{"name": f"tmp-{name}", "emptyDir": {"sizeLimit": "2Gi"}} for name in self._services()]
        out.append({"name": f"tmp-{GATEWAY}", "emptyDir": {"sizeLimit": "64Mi"}})
        out += [
            {
                "name": data_volume_name(project),
                "persistentVolumeClaim": {"claimName": f"{self.data_claim_prefix}{project}", "readOnly": True},
            }
            for project in sorted(self.projects)
        ]
        return out

    def hub_mounts(self) -> list[dict[str, Any]]:
        """``hub.extraVolumeMounts``, the hub's container: the site, the two password files, the state."""
        return [
            {"name": "paitient-site", "mountPath": SITE_FILE, "subPath": "site.toml", "readOnly": True},
            {"name": "paitient-directory", "mountPath": DIRECTORY_FOLDER, "readOnly": True},
            {"name": "paitient-database", "mountPath": DATABASE_FOLDER, "readOnly": True},
            {"name": "paitient-state", "mountPath": self.state_dir},
        ]

    def _services(self) -> list[str]:
        return sorted(self.service_ports)

    # -- the containers ------------------------------------------------------------------------------

    def service_argv(self, name: str) -> list[str]:
        """``paitient service NAME --separate``: the pages on the pod network, signed in through the hub in
        the same pod, with the chart's token for the service."""
        return [
            *PYTHON,
            "-m",
            "paitient.cli",
            "service",
            name,
            f"--site={SITE_FILE}",
            "--separate",
            f"--port={self.service_ports[name]}",
            "--listen=0.0.0.0",
            f"--hub-port={HUB_API_PORT}",
            f"--token-file={SERVICE_TOKEN}",
        ]

    def gateway_argv(self) -> list[str]:
        return [
            *PYTHON,
            "-m",
            "paitient.services.gateway",
            f"--site={SITE_FILE}",
            "--ip=0.0.0.0",
            f"--port={GATEWAY_PORT}",
            f"--tls-cert={TLS_FOLDER}/tls.crt",
            f"--tls-key={TLS_FOLDER}/tls.key",
        ]

    def service_context(self, name: str) -> dict[str, Any]:
        """Root in the container, no capability but what its workers need; see the module's text."""
        if name in SANDBOXING:
            return _context(0, add=WORKER_CAPABILITIES, bubblewrap=True)
        return _context(0)

    def gateway_context(self) -> dict[str, Any]:
        return _context(self.gateway_uid)

    def service_mounts(self, name: str) -> list[dict[str, Any]]:
        mounts: list[dict[str, Any]] = [
            {"name": "paitient-site", "mountPath": SITE_FILE, "subPath": "site.toml", "readOnly": True},
            {"name": "paitient-database", "mountPath": DATABASE_FOLDER, "readOnly": True},
            {"name": "paitient-service-tokens", "mountPath": SERVICE_TOKEN, "subPath": name, "readOnly": True},
            {"name": "paitient-state", "mountPath": self.state_dir},
            {"name": f"tmp-{name}", "mountPath": "/tmp"},  # noqa: S108 - the container's own, an emptyDir
            _no_api_token(),
        ]
        if name in READS_DATA:
            mounts += [
                {"name": data_volume_name(p), "mountPath": f"{self.data_root}/{p}", "readOnly": True}
                for p in sorted(self.projects)
            ]
        return mounts

    def containers(self) -> list[dict[str, Any]]:
        """``hub.extraContainers``: the five services and the gateway."""
        out = [
            {
                "name": name,
                "image": self.image,
                "imagePullPolicy": "IfNotPresent",
                "args": self.service_argv(name),
                "env": _env(),
                "ports": [{"name": f"pages-{name}", "containerPort": self.service_ports[name]}],
                "securityContext": self.service_context(name),
                "volumeMounts": self.service_mounts(name),
            }
            for name in self._services()
        ]
        out.append(
            {
                "name": GATEWAY,
                "image": self.image,
                "imagePullPolicy": "IfNotPresent",
                "args": self.gateway_argv(),
                "env": _env(),
                "ports": [{"name": "gateway", "containerPort": GATEWAY_PORT}],
                "securityContext": self.gateway_context(),
                "volumeMounts": [
                    {"name": "paitient-site", "mountPath": SITE_FILE, "subPath": "site.toml", "readOnly": True},
                    # the token file (root's, 0640 with the gateway's group) and the services' sockets
                    {"name": "paitient-state", "mountPath": self.state_dir, "readOnly": True},
                    {"name": "paitient-gateway-tls", "mountPath": TLS_FOLDER, "readOnly": True},
                    {"name": f"tmp-{GATEWAY}", "mountPath": "/tmp"},  # noqa: S108 - the container's own
                    _no_api_token(),
                ],
            }
        )
        return out

    def init_containers(self) -> list[dict[str, Any]]:
        """``hub.initContainers``: the gateway's key, copied for the gateway's uid (a Secret's files are
        root's, or the pod's ``fsGroup``'s, which would give the hub's password files to that group too)."""
        uid = self.gateway_uid
        return [
            {
                "name": "gateway-tls",
                "image": self.image,
                "imagePullPolicy": "IfNotPresent",
                "command": [
                    "sh",
                    "-c",
                    # the mode first: once the key is the gateway's, root with CHOWN alone may not change it
                    f"install -m 0444 {TLS_SOURCE}/tls.crt {TLS_FOLDER}/tls.crt && "
                    f"install -m 0400 {TLS_SOURCE}/tls.key {TLS_FOLDER}/tls.key && "
                    f"chown {uid}:{uid} {TLS_FOLDER}/tls.key",
                ],
                "securityContext": _context(0, add=("CHOWN",)),
                "volumeMounts": [
                    {"name": "paitient-gateway-tls-source", "mountPath": TLS_SOURCE, "readOnly": True},
                    {"name": "paitient-gateway-tls", "mountPath": TLS_FOLDER},
                    _no_api_token(),
                ],
            }
        ]

    def hub_values(self) -> dict[str, Any]:
        """The generated part of the values' ``hub``."""
        return {
            "extraVolumes": self.volumes(),
            "extraVolumeMounts": self.hub_mounts(),
            "initContainers": self.init_containers(),
            "extraContainers": self.containers(),
        }


def from_values(values: dict[str, Any]) -> ServicesPod:
    """The services' pod for the settings of a values file (``custom.paitient`` and the image)."""
    custom = values["custom"]["paitient"]
    state_dir = str(custom["stateDir"])
    return ServicesPod(
        image=str(custom["servicesImage"]),
        state_dir=state_dir,
        data_root=str(custom.get("dataRoot") or f"{state_dir}/data"),
        gateway_uid=int(custom["gatewayUid"]),
        projects=tuple(custom.get("projectGids") or ()),
        data_claim_prefix=str(custom.get("dataClaimPrefix") or "paitient-data-"),
    )


def main(argv: list[str] | None = None) -> None:
    import sys

    import yaml

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m paitient.hub.kubeservices VALUES (prints the values' generated hub settings)")
    with open(args[0]) as f:
        pod = from_values(yaml.safe_load(f))
    print(yaml.safe_dump({"hub": pod.hub_values()}, sort_keys=False, default_flow_style=False), end="")


if __name__ == "__main__":
    main()
