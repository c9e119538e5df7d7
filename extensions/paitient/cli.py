"""The ``paitient`` command line. Each subcommand is a traitlets Application; ``--help-all`` lists every setting."""

from __future__ import annotations

from traitlets.config import Application

from paitient import __version__

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "up": ("paitient.ops.up.UpCommand", "Run the workspace in the foreground (directory, hub, proxy, services)."),
    "status": ("paitient.ops.up.StatusCommand", "Show what of a workspace runs, with process ids and the URL."),
    "stop": ("paitient.ops.up.StopCommand", "Stop a workspace started with `paitient up` on a state directory."),
    "ingest": ("paitient.services.data.cli.IngestCommand", "Pseudonymise a source table and publish it as a dataset."),
    "datasets": ("paitient.services.data.cli.DatasetsCommand", "List the published datasets and their versions."),
    "ledger": ("paitient.services.ledger.cli.LedgerCommand", "Show the privacy-budget ledger of a project."),
    "audit": ("paitient.services.audit.cli.AuditCommand", "Verify the audit trail or show its records."),
    "airlock": ("paitient.services.airlock.cli.AirlockCommand", "List airlock requests and their state."),
    "service": ("paitient.services.ServiceCommand", "Run one root-side service (ledger, audit, airlock)."),
}


class PaitientApp(Application):
    name = "paitient"
    version = __version__
    description = (
        "paitient: a secure analysis workspace for clinical AI research.\n\n"
        "Run `paitient up` to start the workspace; `paitient SUBCOMMAND --help` for each subcommand."
    )
    subcommands = {name: (cls, text) for name, (cls, text) in SUBCOMMANDS.items()}

    def start(self) -> None:
        if self.subapp is None:
            self.print_help()
            self.exit(2)
        self.subapp.start()


def main(argv: list[str] | None = None) -> None:
    app = PaitientApp.instance()
    app.initialize(argv)
    app.start()


if __name__ == "__main__":
    main()
