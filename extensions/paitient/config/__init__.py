"""The site configuration: one TOML file that says who may sign in, which projects exist, what data they see.

Every part of paitient (hub, spawner, sandbox, services, ingest) reads the same validated object, so a
setting means one thing everywhere. Each setting is declared once, as a traitlets trait with its help text
and default, in the model class of its section (:data:`SECTIONS`, :class:`Project`, :class:`Budget`), with
the rule that checks it next to it. Traits elsewhere that carry a site setting into another process
(:class:`~paitient.services.airlock.settings.AirlockSettings`, the user's server) are made from that
declaration with :func:`site_trait`.

Validation is strict: an unknown key or a bad value is named in the error together with the file and what
would be accepted, and nothing starts on a configuration that does not validate. The loaded object is
frozen. The file is read by root-side processes only and must not be writable by anyone else (see
:func:`check_owner`). ``paitient config --help-all`` lists every setting; ``hub_config/site.example.toml``
and ``docs/config.md`` are generated from the model (``python -m paitient.config --write-docs``).
"""

from paitient.config.database import Database
from paitient.config.directory import Directory, is_loopback
from paitient.config.errors import ConfigError, SettingError
from paitient.config.limits import Audit, Sandbox, Server
from paitient.config.loader import EMBEDDED_SITE, check_owner, load, parse
from paitient.config.model import Model
from paitient.config.outputs import AIRLOCK_KINDS, Airlock, EgressLimits
from paitient.config.projects import Budget, Project
from paitient.config.site import SECTIONS, SiteConfig
from paitient.config.traits import site_trait
from paitient.config.workspace import NAME_RE, Accounts, Workspace

__all__ = [
    "AIRLOCK_KINDS",
    "EMBEDDED_SITE",
    "NAME_RE",
    "SECTIONS",
    "Accounts",
    "Airlock",
    "Audit",
    "Budget",
    "ConfigError",
    "Database",
    "Directory",
    "EgressLimits",
    "Model",
    "Project",
    "Sandbox",
    "Server",
    "SettingError",
    "SiteConfig",
    "Workspace",
    "check_owner",
    "is_loopback",
    "load",
    "parse",
    "site_trait",
]
