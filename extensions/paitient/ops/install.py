"""``paitient install``: systemd units that run the workspace as ``paitient up`` does, from the site configuration.

The units (``--dry-run`` prints them, ``--unit-dir`` picks where they go, default ``/etc/systemd/system``):

- ``paitient-proxy.service``: configurable-http-proxy, the only process researchers' browsers reach. It needs
  no privilege, so it runs as a transient unprivileged user (``DynamicUser=``) with no capabilities (bar
  ``CAP_NET_BIND_SERVICE`` for a public port below 1024), nothing of the file system writable, no homes,
  ``NoNewPrivileges=yes``. Its API token comes from ``<state_dir>/hub/proxy.env`` (root 0600), which systemd
  reads before dropping privileges.
- ``paitient-<service>.service``, one per root-side service (ledger, audit, airlock, egress, jobs, launcher),
  each ``paitient service NAME --separate`` with the hardening its work allows (:data:`SERVICE_HARDENING`):
  the ledger, the audit trail and the egress judge write only the state directory, see no homes, make no
  namespaces and no device; the airlock's and the jobs' sandboxes and the kernel launcher keep namespaces
  (bubblewrap) and netlink (each sandbox's loopback); only the launcher sees the homes. Those with pages
  listen on fixed loopback ports (:data:`paitient.services.kit.process.SEPARATE_PORTS`) and sign people in
  through the hub with an API token they share with it (``<state_dir>/hub/service_<name>_token``, 0600).
- ``paitient-hub.service``: the hub, after the proxy and the services, told the services' ports (it starts
  none). It runs as root: it creates the researchers' system accounts (useradd writes ``/etc/passwd`` and
  friends, so ``/etc`` is among its writable paths) and starts their servers, each through
  :mod:`paitient.hub.servernet` (a network namespace of its own, then the account). ``NoNewPrivileges=yes``
  still applies: root needs no set-user-id program to change to another account. ``ProtectHome=no`` (homes
  are created and used). Stopping or restarting the unit ends researchers' servers with it; they start again
  at their next request. Stopping a service leaves the hub and the servers running: what needs it fails
  closed until it is back (a cell is refused while the audit trail is away, outputs are withheld while the
  egress judge is).
- ``paitient-engine.service``, with the docker spawner only: podman's Docker API for the researchers'
  containers (:func:`engine_unit`), required by the hub and started before it.
- ``paitient.target``: starts them all; ``systemctl enable --now paitient.target``.

A unit runs the same command as ``paitient up`` (``up --separate-services`` runs the services as these units
do), built by :mod:`paitient.ops.commands`; the ports that ``up`` picks free at each start are fixed here
([workspace] hub_port and proxy_api_port, defaults 8081 and 8001, and the services' pages). Production needs
the hospital's directory: a site without a [directory] url is refused.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from traitlets import Bool, Unicode, default

from paitient.app import PaitientCommand
from paitient.config import SiteConfig
from paitient.fsutil import atomic_write_text
from paitient.hub.paths import HubPaths, default_proxy_command
from paitient.ops.commands import (
    PROXY_TOKEN_ENV,
    Command,
    engine_commands,
    hub_command,
    proxy_command,
    service_command,
)
from paitient.services import SERVICES
from paitient.services.kit.process import SEPARATE_PORTS, token_secret

DEFAULT_HUB_PORT = 8081
DEFAULT_PROXY_API_PORT = 8001
PROXY_UNIT = "paitient-proxy.service"
HUB_UNIT = "paitient-hub.service"
ENGINE_UNIT = "paitient-engine.service"
TARGET = "paitient.target"


def service_unit(name: str) -> str:
    return f"paitient-{name}.service"


PROTECTED = {"ProtectHome": "yes", "ProtectControlGroups": "yes"}
"""What a service may not write: the homes and the control groups (the launcher alone writes both)."""
SANDBOXING = {"RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK"}
"""What a service that runs bubblewrap needs: namespaces, and netlink to bring up each sandbox's loopback."""
CONTAINED = {
    "PrivateDevices": "yes",
    "RestrictNamespaces": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
}
"""A service that runs no sandbox: no namespaces, no devices."""
SERVICE_HARDENING: dict[str, dict[str, str]] = {
    "ledger": {**PROTECTED, **CONTAINED},
    "audit": {**PROTECTED, **CONTAINED},
    "egress": {**PROTECTED, **CONTAINED},
    "airlock": {**PROTECTED, **SANDBOXING},
    "jobs": {**PROTECTED, **SANDBOXING},
    # the kernels' homes are bound into their sandboxes, and their runtime dirs read, by the launcher; it puts
    # each account's kernels in a cpu control group (paitient.services.launcher.cpu), so it writes those
    "launcher": {"ProtectHome": "no", "ProtectControlGroups": "no", **SANDBOXING},
}
"""Per service, the hardening beside what every service unit has (no new privileges, a read-only system but
the state directory, private tmp, no kernel modules or tunables); homes and control groups are read-only to
all but the launcher."""


class InstallError(Exception):
    """The site cannot be installed as it is; the message says what to change."""


def fixed_ports(site: SiteConfig) -> tuple[int, int]:
    """The hub's and the proxy API's loopback ports for units (``up`` picks free ones when they are 0)."""
    w = site.workspace
    return w.hub_port or DEFAULT_HUB_PORT, w.proxy_api_port or DEFAULT_PROXY_API_PORT


def proxy_env_file(site: SiteConfig) -> Path:
    return HubPaths.of(site).hub_dir / "proxy.env"


def _quote(arg: str) -> str:
    """One ExecStart= word: quoted when it holds a space or a quote; '%' and '$' are kept literal."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if any(c in arg for c in " \t\"'\\"):
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return arg


def exec_line(command: Command) -> str:
    return " ".join(_quote(a) for a in command.argv)


def _writable(site: SiteConfig) -> list[str]:
    """What the hub and its services write: the state, the data root and the key (when elsewhere), the homes,
    /etc for useradd, and the files useradd may touch if they exist ('-')."""
    paths = [str(site.state_dir)]
    for extra in (site.data_root, site.key_file.parent):
        if site.state_dir not in (extra, *extra.parents):
            paths.append(str(extra))
    paths += [site.accounts.home_root, "/etc", "-/var/log/lastlog", "-/var/log/faillog", "-/var/mail"]
    return list(dict.fromkeys(paths))


PRIVATE_TMP = (Path("/tmp"), Path("/var/tmp"))  # noqa: S108 - the folders PrivateTmp= hides, not used


def _under_tmp(path: Path) -> bool:
    return any(t == path or t in path.parents for t in PRIVATE_TMP)


def check_site(site: SiteConfig) -> None:
    if not site.source:
        raise InstallError(
            "install needs a site configuration file: pass --site=/etc/paitient/site.toml "
            "(the embedded default is a demo; see docs/operations.md)"
        )
    if site.directory.embedded:
        raise InstallError(
            f"{site.source} names no [directory] url: production signs in against the hospital's directory "
            '(e.g. url = "ldaps://ad.hospital.example/"); the embedded demo directory runs only under `paitient up`'
        )
    for what, path in (("state_dir", site.state_dir), ("data_root", site.data_root), ("key_file", site.key_file)):
        if _under_tmp(path):
            raise InstallError(
                f"{what} {path} is under /tmp or /var/tmp, which the units replace with a private one "
                "(PrivateTmp=yes); put it elsewhere, e.g. /var/lib/paitient"
            )


def _service_writable(site: SiteConfig, name: str) -> list[str]:
    """The state directory; for the launcher also the homes (each kernel's home is bound into its sandbox
    read-write, and the sandbox lives in the launcher's view of the file system). Data stays read-only."""
    return [str(site.state_dir), *([site.accounts.home_root] if name == "launcher" else [])]


def service_units(site: SiteConfig, hub_port: int, ports: dict[str, int], header: str) -> dict[str, str]:
    out = {}
    for name in SERVICES:
        command = service_command(site, name, hub_port=hub_port, port=ports.get(name, 0))
        extra = "\n".join(f"{key}={value}" for key, value in SERVICE_HARDENING[name].items())
        out[service_unit(name)] = f"""{header}[Unit]
Description=paitient {name} service
Wants=network-online.target
After=network-online.target
Before={HUB_UNIT}
PartOf={TARGET}

[Service]
Type=simple
ExecStart={exec_line(command)}
Restart=on-failure
RestartSec=2
User=root
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={" ".join(_service_writable(site, name))}
PrivateTmp=yes
ProtectKernelModules=yes
ProtectKernelTunables=yes
LockPersonality=yes
UMask=0022
{extra}

[Install]
WantedBy={TARGET}
"""
    return out


def engine_unit(site: SiteConfig, podman: str, header: str) -> str:
    """The docker spawner's container engine: podman's Docker API on ``<state_dir>/engine``, as ``up`` runs it,
    prepared before, the image made once it answers, its mounts released after it stops."""
    ec = engine_commands(site, podman)
    env = "\n".join(f"Environment={k}={v}" for k, v in sorted(ec.env.items()))
    return f"""{header}[Unit]
Description=paitient container engine (podman's Docker API for the docker spawner)
Before={HUB_UNIT}
PartOf={TARGET}

[Service]
Type=simple
{env}
ExecStartPre={exec_line(ec.prepare)}
ExecStart={exec_line(ec.start)}
ExecStartPost={exec_line(ec.ready)}
ExecStopPost={exec_line(ec.release)}
# the first start makes the single-user image
TimeoutStartSec=300
Restart=on-failure
RestartSec=2
# root: podman makes namespaces, mounts and cgroups for each researcher's container (the containers run as
# the researchers' accounts, with no capabilities); the containers' cgroups are made under this unit's
User=root
Delegate=yes
UMask=0077

[Install]
WantedBy={TARGET}
"""


def _podman(site: SiteConfig, podman: str | None) -> str:
    found = podman or shutil.which("podman")
    if not found or not os.path.isabs(found) or not os.access(found, os.X_OK):
        raise InstallError(
            f"spawner = {site.workspace.spawner!r} runs servers through podman, which is not installed; "
            "run: bash scripts/setup install"
        )
    return found


def units(
    site: SiteConfig, proxy: str, service_ports: dict[str, int] | None = None, podman: str | None = None
) -> dict[str, str]:
    """The unit files' names and contents for ``site``, ``proxy`` being the configurable-http-proxy program;
    the services' pages on ``service_ports`` (default :data:`SEPARATE_PORTS`); with the docker spawner also
    the container engine's unit (``podman``: its program, found on the PATH by default)."""
    ports = dict(SEPARATE_PORTS if service_ports is None else service_ports)
    check_site(site)
    docker = site.workspace.spawner == "paitient-docker"
    hub_port, api_port = fixed_ports(site)
    pc = proxy_command(site, proxy, hub_port=hub_port, proxy_api_port=api_port)
    hc = hub_command(
        site,
        directory_url=site.directory.url,
        hub_port=hub_port,
        proxy_api_port=api_port,
        service_ports=ports,
    )
    services = " ".join(service_unit(name) for name in SERVICES)
    low_port = site.workspace.port < 1024
    caps = "CAP_NET_BIND_SERVICE" if low_port else ""
    header = f"# Written by `paitient install --site={site.source}`; run it again after changing the site.\n"
    proxy_unit = f"""{header}[Unit]
Description=paitient proxy (configurable-http-proxy on {site.workspace.bind_ip}:{site.workspace.port})
Wants=network-online.target
After=network-online.target
PartOf={TARGET}

[Service]
Type=simple
ExecStart={exec_line(pc)}
# {PROXY_TOKEN_ENV}, root 0600, read by systemd before it drops privileges
EnvironmentFile={proxy_env_file(site)}
Restart=on-failure
RestartSec=2
DynamicUser=yes
NoNewPrivileges=yes
CapabilityBoundingSet={caps}
AmbientCapabilities={caps}
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
LockPersonality=yes

[Install]
WantedBy={TARGET}
"""
    rw = " ".join(_writable(site))
    engine = f" {ENGINE_UNIT}" if docker else ""
    hub_unit = f"""{header}[Unit]
Description=paitient hub (sign-in, researchers' servers)
Wants=network-online.target {services}
After=network-online.target {PROXY_UNIT} {services}{engine}
Requires={PROXY_UNIT}{engine}
PartOf={TARGET}

[Service]
Type=simple
ExecStart={exec_line(hc)}
Restart=on-failure
RestartSec=2
# root: creates accounts, starts each server in a network namespace of its own as its account;
# nothing needs set-user-id
User=root
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={rw}
# homes are created and used by researchers' servers
ProtectHome=no
PrivateTmp=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
UMask=0022

[Install]
WantedBy={TARGET}
"""
    target = f"""{header}[Unit]
Description=paitient secure analysis workspace
Wants={PROXY_UNIT} {services}{engine} {HUB_UNIT}
After={PROXY_UNIT} {services}{engine} {HUB_UNIT}

[Install]
WantedBy=multi-user.target
"""
    made = {PROXY_UNIT: proxy_unit, **service_units(site, hub_port, ports, header)}
    if docker:
        made[ENGINE_UNIT] = engine_unit(site, _podman(site, podman), header)
    return {**made, HUB_UNIT: hub_unit, TARGET: target}


def write_units(site: SiteConfig, proxy: str, unit_dir: Path) -> list[Path]:
    """Write the units (each atomically, 0644) and the proxy's token file (0600); returns the units' paths."""
    made = units(site, proxy)
    paths = HubPaths.of(site)
    paths.prepare()
    atomic_write_text(proxy_env_file(site), f"{PROXY_TOKEN_ENV}={paths.secret('proxy_token')}\n", mode=0o600)
    for name in SERVICES:
        paths.secret(token_secret(name))  # the hub and the service read it; made once, here
    unit_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for name, text in made.items():
        atomic_write_text(unit_dir / name, text, mode=0o644)
        out.append(unit_dir / name)
    return out


class InstallCommand(PaitientCommand):
    name = "install"
    description = (
        "Write systemd units for the proxy, each root-side service and the hub from the site configuration, "
        "running what `paitient up --separate-services` runs, hardened. --dry-run prints them. Then: "
        "systemctl daemon-reload && systemctl enable --now paitient.target"
    )
    examples = "paitient install --site=/etc/paitient/site.toml --dry-run"
    unit_dir = Unicode("/etc/systemd/system", help="Where the unit files go.").tag(config=True)
    dry_run = Bool(False, help="Print the units instead of writing them.").tag(config=True)
    proxy_command = Unicode(help="The configurable-http-proxy executable.").tag(config=True)
    aliases = {
        **PaitientCommand.aliases,
        "unit-dir": "InstallCommand.unit_dir",
        "proxy-command": "InstallCommand.proxy_command",
    }
    flags = {"dry-run": ({"InstallCommand": {"dry_run": True}}, "Print the units instead of writing them.")}

    @default("proxy_command")
    def _proxy_command_default(self) -> str:
        return default_proxy_command()

    def start(self) -> None:
        site = self.load_site()
        if not os.access(self.proxy_command, os.X_OK):
            self.fail(f"the proxy {self.proxy_command} is not installed; run: bash scripts/setup install")
        try:
            if self.dry_run:
                for name, text in units(site, self.proxy_command).items():
                    print(f"# --- {name}\n{text}")
                return
            self.require_root()
            written = write_units(site, self.proxy_command, Path(self.unit_dir))
        except InstallError as e:
            self.fail(str(e))
        for path in written:
            print(f"paitient: wrote {path}")
        print("paitient: now run: systemctl daemon-reload && systemctl enable --now paitient.target")
