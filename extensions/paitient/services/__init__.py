"""Zone ``paitient.services``: the root-side services, and ``paitient service NAME`` that runs one.

Process: one per service, started by the hub as a managed service. User: root.
Trusted for: every decision that counts (budget, release, record). Each service has its own store, its API
(a unix socket under ``<state_dir>/run``, the caller known by ``SO_PEERCRED``; pages under
``/services/NAME/`` behind the hub's OAuth) and its CLI. Services use each other only through those APIs;
what they share is in :mod:`paitient.services.kit`. A service module exposes ``serve(site, log)``, which
blocks.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from traitlets import Bool, Integer, Unicode

from paitient.app import PaitientCommand
from paitient.services.kit.process import die_with_parent

SERVICES = {
    "ledger": "paitient.services.ledger.service",
    "audit": "paitient.services.audit.service",
    "airlock": "paitient.services.airlock.service",
    "egress": "paitient.services.egress.service",
    "jobs": "paitient.services.jobs.service",
    "launcher": "paitient.services.launcher.service",
}

PAGES = {"airlock": "Airlock", "ledger": "Privacy ledger", "audit": "Audit trail", "egress": "Egress"}
"""The services with web pages, as the header of every page names them (:mod:`paitient.services.kit.pages`)."""


class ServiceCommand(PaitientCommand):
    name = "service"
    description = "Run one root-side service (ledger, audit, airlock, egress, jobs, launcher) in the foreground."
    service = Unicode("", help="Which service: " + ", ".join(SERVICES)).tag(config=True)
    separate = Bool(
        False,
        help="Run on its own (a systemd unit, `paitient up --separate-services`), not started by the hub: its "
        "pages' sign-in settings come from --port, --hub-port and --token-file instead of the hub.",
    ).tag(config=True)
    port = Integer(0, help="With --separate: the loopback port of the service's pages.").tag(config=True)
    hub_port = Integer(0, help="With --separate: the hub's API port on loopback.").tag(config=True)
    token_file = Unicode("", help="With --separate: the file (root 0600) holding the service's API token.").tag(
        config=True
    )
    hub_api_url = Unicode(
        "",
        help="With --separate: the hub's API where it is not on loopback (Kubernetes: http://hub:8081/hub/api); "
        "then --hub-port is not needed.",
    ).tag(config=True)
    listen = Unicode(
        "",
        help="With --separate: the address the pages bind where the hub's proxy is not on this machine "
        "(Kubernetes' services' pod: 0.0.0.0, with the pod's policy letting in the proxy and the hub only). "
        "Empty: loopback.",
    ).tag(config=True)
    aliases = {
        **PaitientCommand.aliases,
        "port": "ServiceCommand.port",
        "hub-port": "ServiceCommand.hub_port",
        "token-file": "ServiceCommand.token_file",
        "hub-api-url": "ServiceCommand.hub_api_url",
        "listen": "ServiceCommand.listen",
    }
    flags = {"separate": ({"ServiceCommand": {"separate": True}}, "Run on its own, not started by the hub.")}

    def parse_command_line(self, argv=None):
        super().parse_command_line(argv)
        if self.extra_args:
            self.service = self.extra_args[0]

    def start(self) -> None:
        if self.service not in SERVICES:
            self.fail(f"name a service: paitient service {{{','.join(SERVICES)}}}")
        self.require_root()
        die_with_parent()
        if (self.listen or self.hub_api_url) and not self.separate:
            self.fail("--listen and --hub-api-url are for a service run with --separate; the hub sets a managed one's")
        site = self.load_site()
        module = importlib.import_module(SERVICES[self.service])
        if self.separate:
            self._separate_env(module, site)
        module.serve(site, self.log)

    def _separate_env(self, module, site) -> None:
        """Set what the hub would have set for its managed service (nothing for a service without pages)."""
        from paitient.services.kit.process import separate_service, separate_service_env

        entry = separate_service(module.hub_service(site, sys.executable, port=self.port), "")
        if entry is None:
            return
        if not (self.port and (self.hub_port or self.hub_api_url) and self.token_file):
            self.fail(
                f"paitient service {self.service} --separate needs --port, --token-file and --hub-port (or "
                "--hub-api-url)"
            )
        if self.hub_api_url and not self.hub_api_url.startswith(("http://", "https://")):
            self.fail(f"--hub-api-url must be the hub's API URL (http://HOST:PORT/hub/api), not {self.hub_api_url!r}")
        try:
            token = Path(self.token_file).read_text().strip()
        except OSError as e:
            self.fail(f"cannot read the service's token from {self.token_file}: {e.strerror}")
        if not token:
            self.fail(f"the token file {self.token_file} is empty; run `paitient install` again to write it")
        os.environ.update(
            separate_service_env(entry, token, self.hub_port, self.hub_api_url, site.workspace.subdomain_host)
        )
        if self.listen:
            from paitient.services.kit.pages import LISTEN_ENV

            os.environ[LISTEN_ENV] = self.listen
