"""The hub process that ``paitient up`` starts: JupyterHub configured from the site configuration.

Started as ``python -m paitient.hub.run --site=... --state-dir=... --directory-url=... --hub-port=N
--proxy-api-port=N --spawner=NAME``. It runs in its own process (and its own traitlets singleton) so the hub can be
restarted without touching the proxy, the directory or the researchers' servers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from traitlets.config import Config

from paitient import config as site_config
from paitient.hub.hubconfig import configure
from paitient.hub.paths import HubPaths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m paitient.hub.run", description=__doc__)
    parser.add_argument("--site", default="")
    parser.add_argument("--state-dir", default="")
    parser.add_argument("--directory-url", required=True)
    parser.add_argument("--hub-port", type=int, required=True)
    parser.add_argument("--proxy-api-port", type=int, required=True)
    parser.add_argument("--spawner", default="", help="[workspace] spawner, as `paitient up --spawner` overrides it")
    parser.add_argument(
        "--separate-services",
        default=None,
        type=service_ports,
        help="NAME:PORT,...: the services run on their own (systemd units) with their pages on these ports",
    )
    args = parser.parse_args(argv)

    workspace = {"state_dir": args.state_dir} if args.state_dir else {}
    if args.spawner:
        workspace["spawner"] = args.spawner
    site = site_config.load(args.site or None, overrides={"workspace": workspace} if workspace else None)
    paths = HubPaths.of(site)
    cfg = configure(
        Config(),
        site,
        directory_url=args.directory_url,
        hub_port=args.hub_port,
        proxy_api_port=args.proxy_api_port,
        separate_services=args.separate_services,
    )

    from paitient.hub import records
    from paitient.services import audit

    # required: the hub does not start unrecorded, and what waited from the hub before goes first
    records.record(
        site,
        required=True,
        actor="system",
        action="config.effective",
        object=site.source or "embedded-default",
        details=audit.config_details(site),
    )

    records.register_metrics(site)
    hub = hub_class(site)
    os.chdir(paths.hub_dir)  # no stray jupyterhub_config.py is read from elsewhere
    hub.instance(config=cfg)  # the singleton launch_instance() then initializes and runs
    hub.launch_instance(argv=[])


def service_ports(text: str) -> dict[str, int]:
    """``ledger:8102,audit:8103`` -> ``{"ledger": 8102, "audit": 8103}`` (empty text: none has pages)."""
    out: dict[str, int] = {}
    for item in filter(None, text.split(",")):
        name, sep, port = item.partition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise argparse.ArgumentTypeError(f"not NAME:PORT: {item!r}")
        out[name] = int(port)
    return out


SERVICE_POLL = 0.05
"""How often the hub looks whether a managed service it started has opened its pages (JupyterHub's own wait
starts at 0.2 s and doubles, so a service ready after 1.5 s may be noticed after 3 s; and the services start one
after another)."""


def hub_class(site: site_config.SiteConfig) -> Any:
    """JupyterHub, which at its start also revokes any API token a researcher still holds
    (:func:`paitient.hub.tokens.sweep`), each revocation in the audit trail, notices a managed service
    ready within :data:`SERVICE_POLL`, and with subdomains answers its pages on its own host only
    (:mod:`paitient.hub.hosts`)."""
    from jupyterhub.app import JupyterHub
    from jupyterhub.objects import Server
    from jupyterhub.utils import AnyTimeoutError

    from paitient.hub import tokens
    from paitient.services import audit

    class PaitientHub(JupyterHub):  # type: ignore[misc]
        def init_tornado_application(self) -> None:
            super().init_tornado_application()
            if self.subdomain_host:
                from paitient.hub import hosts

                hosts.install(self.tornado_application, self.subdomain_host, self.base_url)

        async def init_role_assignment(self) -> None:
            await super().init_role_assignment()
            revoked = tokens.sweep(self.db)
            for name, prefixes in sorted(revoked.items()):
                self.log.warning("revoked %d API token(s) of %s: researchers hold none", len(prefixes), name)
                audit.emit(
                    site, actor="system", action="auth.token", object=name, details=tokens.revoked_details(prefixes)
                )

        async def start_service(self, service_name: str, service: Any, ssl_context: Any = None) -> bool:
            """As JupyterHub's, in the same order and with the same verdicts, but a managed service with pages
            is watched every :data:`SERVICE_POLL` until it accepts connections (then JupyterHub's own HTTP
            check, which passes at its first try) or exits."""
            if not (service.managed and service.url):
                return bool(await super().start_service(service_name, service, ssl_context))
            self.log.info("Starting managed service %s at %s", service_name, service.url)
            try:
                await service.start()
            except Exception:
                self.log.critical("Failed to start service %s", service_name, exc_info=True)
                return False
            server = Server.from_orm(service.orm.server)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + service.timeout
            while not server.is_up():
                status = await service.spawner.poll()
                if status is not None:
                    self.log.critical("Service %s exited with status %s", service_name, status)
                    return False
                if loop.time() > deadline:
                    self.log.critical("Cannot connect to %s service %s", service_name, service.kind)
                    return False
                await asyncio.sleep(SERVICE_POLL)
            try:
                await server.wait_up(http=True, timeout=max(1.0, deadline - loop.time()), ssl_context=ssl_context)
            except AnyTimeoutError:
                self.log.critical("Cannot connect to %s service %s", service_name, service.kind)
                return False
            return True

    return PaitientHub


if __name__ == "__main__":
    main()
