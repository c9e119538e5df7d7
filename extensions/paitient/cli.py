"""The ``paitient`` command line. Each subcommand is a traitlets Application; ``--help-all`` lists every setting."""

from __future__ import annotations

import json
from collections.abc import Generator

from traitlets import Bool
from traitlets.config import Application

from paitient import __version__
from paitient.app import PaitientCommand

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "up": ("paitient.ops.up.UpCommand", "Run the workspace in the foreground (directory, hub, proxy, services)."),
    "status": ("paitient.ops.up.StatusCommand", "Show what of a workspace runs, with process ids and the URL."),
    "stop": ("paitient.ops.up.StopCommand", "Stop a workspace started with `paitient up` on a state directory."),
    "install": ("paitient.ops.install.InstallCommand", "Write hardened systemd units that run the workspace."),
    "uninstall": (
        "paitient.ops.uninstall.UninstallCommand",
        "Remove the units install wrote and the workspace's accounts; state only when told.",
    ),
    "backup": ("paitient.ops.backup.BackupCommand", "Write a consistent, verifiable backup of the workspace's state."),
    "restore": ("paitient.ops.backup.RestoreCommand", "Restore a backup into a fresh state directory (checked first)."),
    "ingest": ("paitient.services.data.cli.IngestCommand", "Pseudonymise a source table and publish it as a dataset."),
    "datasets": ("paitient.services.data.cli.DatasetsCommand", "List the published datasets and their versions."),
    "ledger": ("paitient.services.ledger.cli.LedgerCommand", "Show the privacy-budget ledger of a project."),
    "audit": ("paitient.services.audit.cli.AuditCommand", "Verify the audit trail or show its records."),
    "airlock": ("paitient.services.airlock.cli.AirlockCommand", "List airlock requests and their state."),
    "jobs": (
        "paitient.services.jobs.cli.JobsCommand",
        "Check a signed training record and its weights offline; manage pretrained checkpoints.",
    ),
    "accounts": ("paitient.accounts_cli.AccountsCommand", "List the workspace's system accounts; prune unwanted ones."),
    "service": (
        "paitient.services.ServiceCommand",
        "Run one root-side service (ledger, audit, airlock, egress, jobs, launcher).",
    ),
    "config": ("paitient.cli.ConfigCommand", "Print the effective site configuration; --help-all lists every setting."),
}


class ConfigCommand(PaitientCommand):
    name = "config"
    description = (
        "Print the effective, validated site configuration of --site=PATH (default: the embedded demo) as TOML. "
        "`paitient config --help-all` lists every site setting with its section, help and default."
    )
    examples = "paitient config --site=/etc/paitient/site.toml\npaitient config --help-all"
    as_json = Bool(False, help="Print JSON instead of TOML.").tag(config=True)
    flags = {"json": ({"ConfigCommand": {"as_json": True}}, "Print JSON instead of TOML.")}

    def start(self) -> None:
        from paitient.config.reference import effective_toml

        site = self.load_site()
        print(json.dumps(site.to_dict(), indent=2) if self.as_json else effective_toml(site), end="")

    def emit_help_epilogue(self, classes: bool) -> Generator[str, None, None]:
        if classes:
            from paitient.config.reference import help_all

            yield help_all()
        else:
            yield "To see every site setting with its section, help and default, use `--help-all`."
            yield ""


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
        else:
            self.subapp.start()


def main(argv: list[str] | None = None) -> None:
    app = PaitientApp.instance()
    app.initialize(argv)
    app.start()


if __name__ == "__main__":
    main()
