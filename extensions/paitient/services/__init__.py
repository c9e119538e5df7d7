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

from traitlets import Unicode

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

    def parse_command_line(self, argv=None):
        super().parse_command_line(argv)
        if self.extra_args:
            self.service = self.extra_args[0]

    def start(self) -> None:
        if self.service not in SERVICES:
            self.fail(f"name a service: paitient service {{{','.join(SERVICES)}}}")
        self.require_root()
        die_with_parent()
        site = self.load_site()
        module = importlib.import_module(SERVICES[self.service])
        module.serve(site, self.log)
