"""The commands that run a workspace: the proxy and the hub, with their arguments and environment.

``paitient up`` starts them as its children; ``paitient install`` writes them into systemd units. Both take
them from here, so a unit runs exactly what ``up`` runs. The root-side services run either as the hub's managed
services (:func:`paitient.services.kit.process.managed_service`; ``up``'s default) or each on its own
(:func:`service_command`; a systemd unit each, or ``up --separate-services``), the hub then told their ports.
"""

from __future__ import annotations

from dataclasses import dataclass

from paitient.config import SiteConfig
from paitient.hub.paths import HubPaths, venv_python
from paitient.services.kit.process import token_secret

PROXY_TOKEN_ENV = "CONFIGPROXY_AUTH_TOKEN"  # noqa: S105 - the name of a variable, not a secret
"""The proxy reads its API token from this variable (never from its command line, which others can see)."""


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env_names: tuple[str, ...] = ()
    """Variables the command needs in its environment (their values are secrets kept elsewhere)."""


def proxy_command(site: SiteConfig, proxy: str, *, hub_port: int, proxy_api_port: int) -> Command:
    """configurable-http-proxy on the public address, its API on loopback, everything else to the hub; routing
    by host where the site gives every server its own origin (``[workspace] subdomain_host``)."""
    w = site.workspace
    return Command(
        [
            proxy,
            "--ip",
            w.bind_ip,
            "--port",
            str(w.port),
            "--api-ip",
            "127.0.0.1",
            "--api-port",
            str(proxy_api_port),
            "--default-target",
            f"http://127.0.0.1:{hub_port}",
            "--error-target",
            f"http://127.0.0.1:{hub_port}/hub/error",
            # with subdomains the hub's routes name a host ("alice.HOST/user/alice/"), matched on Host
            *(["--host-routing"] if w.subdomain_host else []),
        ],
        (PROXY_TOKEN_ENV,),
    )


def hub_command(
    site: SiteConfig,
    *,
    directory_url: str,
    hub_port: int,
    proxy_api_port: int,
    service_ports: dict[str, int] | None = None,
) -> Command:
    """The hub (:mod:`paitient.hub.run`), which starts the researchers' servers and, unless ``service_ports``
    names the ports of services that run on their own, the services."""
    argv = [
        venv_python(),
        "-m",
        "paitient.hub.run",
        f"--site={site.source}",
        f"--state-dir={site.state_dir}",
        f"--directory-url={directory_url}",
        f"--hub-port={hub_port}",
        f"--proxy-api-port={proxy_api_port}",
        f"--spawner={site.workspace.spawner}",
    ]
    if service_ports is not None:
        argv.append("--separate-services=" + ",".join(f"{n}:{p}" for n, p in sorted(service_ports.items())))
    return Command(argv)


def service_command(site: SiteConfig, name: str, *, hub_port: int, port: int) -> Command:
    """A root-side service on its own (``paitient service NAME --separate``): its pages on ``port`` (0 for a
    service without pages), signed in through the hub on ``hub_port`` with the token the hub also reads."""
    argv = [venv_python(), "-m", "paitient.cli", "service", name, f"--state-dir={site.state_dir}"]
    if site.source:
        argv.append(f"--site={site.source}")
    argv.append("--separate")
    if port:
        token_file = HubPaths.of(site).hub_dir / token_secret(name)
        argv += [f"--port={port}", f"--hub-port={hub_port}", f"--token-file={token_file}"]
    return Command(argv)


@dataclass(frozen=True)
class EngineCommands:
    """The docker spawner's engine as a systemd unit runs it: its API service, and the steps around it."""

    prepare: Command
    start: Command
    ready: Command
    release: Command
    env: dict[str, str]


def engine_commands(site: SiteConfig, podman: str) -> EngineCommands:
    """podman's Docker API on ``<state_dir>/engine`` (:class:`paitient.hub.engine.Engine`, as ``up`` starts it),
    with ``python -m paitient.hub.engine prepare``, ``ready`` and ``release`` around it."""
    from paitient.hub.engine import Engine

    engine = Engine(site.state_dir, podman=podman)

    def step(name: str) -> Command:
        return Command(
            [
                venv_python(),
                "-I",
                "-m",
                "paitient.hub.engine",
                name,
                f"--state-dir={site.state_dir}",
                f"--podman={podman}",
            ]
        )

    return EngineCommands(
        step("prepare"), Command(engine.service_command()), step("ready"), step("release"), engine.env
    )
