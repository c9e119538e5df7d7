"""The commands that run a workspace: the proxy and the hub, with their arguments and environment.

``paitient up`` starts them as its children; ``paitient install`` writes them into systemd units. Both take
them from here, so a unit runs exactly what ``up`` runs. The hub starts the root-side services itself (as its
managed services, :func:`paitient.services.kit.process.managed_service`), under either.
"""

from __future__ import annotations

from dataclasses import dataclass

from paitient.config import SiteConfig
from paitient.hub.paths import venv_python

PROXY_TOKEN_ENV = "CONFIGPROXY_AUTH_TOKEN"  # noqa: S105 - the name of a variable, not a secret
"""The proxy reads its API token from this variable (never from its command line, which others can see)."""


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env_names: tuple[str, ...] = ()
    """Variables the command needs in its environment (their values are secrets kept elsewhere)."""


def proxy_command(site: SiteConfig, proxy: str, *, hub_port: int, proxy_api_port: int) -> Command:
    """configurable-http-proxy on the public address, its API on loopback, everything else to the hub."""
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
        ],
        (PROXY_TOKEN_ENV,),
    )


def hub_command(site: SiteConfig, *, directory_url: str, hub_port: int, proxy_api_port: int) -> Command:
    """The hub (:mod:`paitient.hub.run`), which starts the services and the researchers' servers."""
    return Command(
        [
            venv_python(),
            "-m",
            "paitient.hub.run",
            f"--site={site.source}",
            f"--state-dir={site.state_dir}",
            f"--directory-url={directory_url}",
            f"--hub-port={hub_port}",
            f"--proxy-api-port={proxy_api_port}",
        ]
    )
