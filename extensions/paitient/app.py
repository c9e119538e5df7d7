"""Base class for ``paitient`` subcommands: a traitlets Application that knows the site configuration."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, ClassVar, NoReturn

from traitlets import Unicode, default
from traitlets.config import Application

from paitient import __version__
from paitient.config import ConfigError, SiteConfig, Workspace, load


class PaitientCommand(Application):
    """A ``paitient`` subcommand.

    ``--site=PATH`` picks the site configuration, ``--state-dir`` overrides its state directory.
    """

    version = __version__

    site = Unicode(
        "",
        help="Site configuration file (TOML). Empty: the embedded demo default (demo directory, demo data).",
    ).tag(config=True)

    state_dir = Unicode(
        "",
        help="Where all state lives (directory, hub database, services, data). "
        f"Overrides [workspace] state_dir of the site configuration; default {Workspace.state_dir.default_value}.",
    ).tag(config=True)

    aliases = {
        "site": "PaitientCommand.site",
        "state-dir": "PaitientCommand.state_dir",
        "log-level": "Application.log_level",
    }

    @default("log_format")
    def _log_format(self) -> str:
        return "[%(levelname)1.1s %(asctime)s %(name)s] %(message)s"

    def overrides(self) -> dict[str, dict]:
        """Command-line settings that override the site configuration file."""
        out: dict[str, dict] = {}
        if self.state_dir:
            out.setdefault("workspace", {})["state_dir"] = str(Path(self.state_dir).absolute())
        return out

    def load_site(self) -> SiteConfig:
        try:
            return load(self.site or None, overrides=self.overrides())
        except ConfigError as e:
            self.fail(f"site configuration: {e}")

    def exit(self, exit_status: int | str | None = 0) -> NoReturn:
        """End the command with ``exit_status``: nothing after a call runs."""
        super().exit(exit_status)
        # Application.exit ends in sys.exit but is annotated to return None: say so, and make sure of it
        raise SystemExit(exit_status)

    def fail(self, message: str, code: int = 2) -> NoReturn:
        """Tell the user what went wrong and what to do, and end the command with ``code``."""
        print(f"paitient {self.name}: {message}", file=sys.stderr)
        self.exit(code)

    def require_root(self) -> None:
        if os.geteuid() != 0:
            self.fail("must run as root (it manages system accounts, the data root and root-owned state)")


class CommandGroup(PaitientCommand):
    """A command whose work is done by one of its subcommands (``paitient audit verify``).

    A group names its subcommands' classes in :attr:`commands`; each one's ``description`` is its help line.
    """

    commands: ClassVar[dict[str, type[PaitientCommand]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.subcommands = {name: (command, command.description) for name, command in cls.commands.items()}

    def start(self) -> None:
        if self.subapp is None:
            choices = " | ".join(f"paitient {self.name} {name}" for name in self.commands)
            self.fail(f"name what to do: {choices}  (--help for options)")
        self.subapp.start()
