"""The airlock service: the only way out of the workspace, run root-side as a JupyterHub-managed service.

``paitient service airlock`` runs :func:`serve`, which serves

- a unix socket ``<run_dir>/airlock.sock`` for kernels (:mod:`paitient.services.kit.channel`): ``request`` takes the
  file as an open descriptor (so the service reads exactly what the caller could open), ``status`` and
  ``list`` show the caller's own requests. The caller is who ``SO_PEERCRED`` says, looked up in the
  account registry;
- the review and download pages under ``/services/airlock/`` on a loopback port, signed in through the
  hub's OAuth (:mod:`paitient.services.airlock.web`);
- the check worker (:class:`paitient.services.airlock.core.Airlock`).

The hub configuration takes :func:`hub_service` and :func:`custom_scopes` from here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any
from urllib.parse import urlparse

from traitlets.config import Config

from paitient.config import SiteConfig
from paitient.services.airlock.core import Airlock
from paitient.services.airlock.settings import (
    SCOPE_DOWNLOAD,
    SCOPE_REQUEST,
    SCOPE_REVIEW,
    AirlockSettings,
    custom_scopes,
    role_scopes,
)
from paitient.services.kit.access import channel_options
from paitient.services.kit.channel import ChannelServer
from paitient.services.kit.process import managed_service

__all__ = [
    "SCOPE_DOWNLOAD",
    "SCOPE_REQUEST",
    "SCOPE_REVIEW",
    "Airlock",
    "AirlockSettings",
    "custom_scopes",
    "hub_service",
    "role_scopes",
    "serve",
    "settings_for",
]


def hub_service(site: SiteConfig, python: str, *, port: int | None = None) -> dict[str, Any]:
    """The ``JupyterHub.services`` entry that runs the airlock as a managed service."""
    return managed_service(
        site,
        "airlock",
        python,
        port=port or AirlockSettings().port,
        scopes=list(custom_scopes()),
        description="Request, review and download outputs that leave the workspace.",
    )


def settings_for(site: SiteConfig, config: Config | None = None) -> AirlockSettings:
    """The site's [airlock] section, overridden by ``--AirlockSettings.<name>=...`` on the command line."""
    settings = AirlockSettings(**site.airlock.to_dict())
    if config is not None:
        settings.update_config(config)
    return settings


def serve(site: SiteConfig, log: logging.Logger, *, settings: AirlockSettings | None = None) -> None:
    """Run the airlock until SIGTERM/SIGINT: the kernel socket, the check worker and the web pages.

    The pages need the hub (its OAuth signs people in): outside a hub (no ``JUPYTERHUB_API_TOKEN``) only
    the socket and the checks run, and ``paitient airlock`` shows the requests.
    """
    from paitient.services.airlock import web
    from paitient.services.kit.process import socket_path

    if settings is None:
        from paitient.services import ServiceCommand

        settings = settings_for(site, ServiceCommand.instance().config if ServiceCommand.initialized() else None)
    with_pages = bool(os.environ.get("JUPYTERHUB_API_TOKEN"))
    port = settings.port or urlparse(os.environ.get("JUPYTERHUB_SERVICE_URL", "")).port or 0
    if with_pages and not port:
        raise SystemExit(
            "the airlock needs a port for its pages: run it as a hub-managed service "
            "(JUPYTERHUB_SERVICE_URL) or pass --AirlockSettings.port=N"
        )
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/airlock/")
    airlock = Airlock(site, settings=settings, log=log)
    site.run_dir.mkdir(parents=True, exist_ok=True)
    channel = ChannelServer(
        socket_path(site, "airlock"),
        airlock.handlers(),
        name="airlock",
        **channel_options(site, "airlock", airlock.emit),
    )
    channel.start_in_thread()
    airlock.start()

    async def main() -> None:
        server = None
        if with_pages:
            server = web.make_app(airlock, prefix=prefix).listen(port, address="127.0.0.1")
            log.info("airlock: socket %s, pages on http://127.0.0.1:%d%s", channel.path, port, prefix)
        else:
            log.warning(
                "airlock: socket %s; no hub (JUPYTERHUB_API_TOKEN unset), so no review pages: run it "
                "as a hub-managed service for review and download",
                channel.path,
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        if server is not None:
            server.stop()

    try:
        asyncio.run(main())
    finally:
        channel.shutdown()
        channel.server_close()
        airlock.stop()
