""":class:`SiteConfig`: the whole validated site configuration, one attribute per section."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from paitient.config.database import Database
from paitient.config.directory import Directory
from paitient.config.errors import SettingError
from paitient.config.limits import Audit, Sandbox, Server
from paitient.config.model import Model
from paitient.config.outputs import Airlock, EgressLimits, Jobs
from paitient.config.projects import Project
from paitient.config.traits import Part, Parts, Text
from paitient.config.workspace import Accounts, Workspace

SECTIONS: dict[str, type[Model]] = {
    "workspace": Workspace,
    "directory": Directory,
    "accounts": Accounts,
    "audit": Audit,
    "sandbox": Sandbox,
    "server": Server,
    "egress": EgressLimits,
    "airlock": Airlock,
    "jobs": Jobs,
    "database": Database,
}
"""The site file's sections in the order they are documented, name -> model class; then [[projects]]."""


class SiteConfig(Model):
    """The site configuration: every section, the projects, and the file it came from."""

    unknown_key = "unknown section {key!r}; sections: {known}"

    workspace = Part(Workspace, help="[workspace]")
    directory = Part(Directory, help="[directory]")
    accounts = Part(Accounts, help="[accounts]")
    audit = Part(Audit, help="[audit]")
    sandbox = Part(Sandbox, help="[sandbox]")
    server = Part(Server, help="[server]")
    egress = Part(EgressLimits, help="[egress]")
    airlock = Part(Airlock, help="[airlock]")
    jobs = Part(Jobs, help="[jobs]")
    database = Part(Database, help="[database]")
    projects = Parts(Project, help="[[projects]]")
    source = Text("", help="Path the configuration was read from (empty for the embedded default).")

    _egress: dict[str, EgressLimits]
    """Each project's egress limits (its overrides over [egress]), made once with the configuration."""
    _egress_by_projects: dict[frozenset[str], EgressLimits]
    """A user's limits by their set of projects, made at first use (the configuration does not change)."""

    def __init__(self, *args: Any, **values: Any) -> None:
        super().__init__(*args, **values)
        merged = {p.name: self.egress.replace(**p.egress) if p.egress else self.egress for p in self.projects}
        object.__setattr__(self, "_egress", merged)
        object.__setattr__(self, "_egress_by_projects", {})

    def check(self) -> None:
        names = [p.name for p in self.projects]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise SettingError(("projects",), None, f"names must be unique; repeated: {', '.join(repeated)}")
        if self.workspace.ledger_url and self.database.url:
            raise SettingError(
                ("workspace",),
                "ledger_url",
                "is replaced by [database] url, which is set too; remove ledger_url (the ledger then lives in the "
                "schema 'ledger' of [database] url's database; move its tables there first, see docs/operations.md)",
            )
        if self.jobs.account == self.airlock.audit_account:
            raise SettingError(
                ("airlock",),
                "audit_account",
                f"must differ from [jobs] account (both are {self.jobs.account!r}): each root-side worker that runs "
                "untrusted computations gets its own account",
            )

    @property
    def state_dir(self) -> Path:
        return Path(self.workspace.state_dir)

    @property
    def data_root(self) -> Path:
        return Path(self.workspace.data_root or self.state_dir / "data")

    @property
    def key_file(self) -> Path:
        return Path(self.workspace.key_file or self.state_dir / "keys" / "pseudonym.key")

    @property
    def run_dir(self) -> Path:
        """Unix sockets of the services; bound read-only into every sandbox at the same path."""
        return self.state_dir / "run"

    def project(self, name: str) -> Project:
        for p in self.projects:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.projects) or "none"
        raise KeyError(f"no project {name!r} in the site configuration (projects: {known})")

    def egress_for(self, project: str) -> EgressLimits:
        """The egress limits of ``project``: its ``egress = { ... }`` over the [egress] section."""
        self.project(project)  # KeyError naming the known projects
        return self._egress[project]

    def egress_for_user(self, projects: Iterable[str]) -> EgressLimits:
        """The egress limits of a user in ``projects``: the strictest of each limit over those projects.

        Projects the site no longer lists are left out; a user in none gets the [egress] section."""
        key = frozenset(projects)
        made = self._egress_by_projects.get(key)
        if made is None:
            limits = [self._egress[name] for name in sorted(key) if name in self._egress]
            made = self._egress_by_projects[key] = EgressLimits.strictest(limits) if limits else self.egress
        return made
