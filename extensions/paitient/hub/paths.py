"""Where the hub side keeps its state under ``<state_dir>``.

All of it is owned by root. Users can traverse ``<state_dir>`` (0755) to reach the service sockets in
``run/`` and their own server's read-only configuration in ``users/<account>/``; everything else is 0700.
"""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from paitient.config import SiteConfig
from paitient.fsutil import atomic_write_text

EMBEDDED_SERVICE_DN = "cn=paitient-service,ou=services,dc=hospital,dc=example"
"""The hub's service account in the embedded directory (``paitient up`` without a site file)."""


@dataclass(frozen=True)
class HubPaths:
    state_dir: Path

    @classmethod
    def of(cls, site: SiteConfig) -> HubPaths:
        return cls(site.state_dir)

    @property
    def hub_dir(self) -> Path:
        return self.state_dir / "hub"

    @property
    def users_dir(self) -> Path:
        """Root-owned per-account server configuration (read-only to the account)."""
        return self.state_dir / "users"

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def up_file(self) -> Path:
        """What ``paitient up`` runs: pids, ports, URL (read by ``paitient status`` and ``stop``)."""
        return self.state_dir / "up.json"

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.hub_dir / 'jupyterhub.sqlite'}"

    @property
    def cookie_secret_file(self) -> Path:
        return self.hub_dir / "jupyterhub_cookie_secret"

    @property
    def embedded_service_password_file(self) -> Path:
        """Password of :data:`EMBEDDED_SERVICE_DN` (0600), written when ``paitient up`` seeds the embedded
        directory; the hub reads memberships with it."""
        return self.state_dir / "directory" / "service-password"

    def user_dir(self, account: str) -> Path:
        return self.users_dir / account

    def prepare(self) -> None:
        """Create the directories with their modes; safe to call again."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o755)
        for path, mode in (
            (self.hub_dir, 0o700),
            (self.users_dir, 0o755),
            (self.run_dir, 0o755),
            (self.log_dir, 0o700),
        ):
            path.mkdir(exist_ok=True)
            os.chown(path, 0, 0)
            os.chmod(path, mode)

    def secret(self, name: str, nbytes: int = 32) -> str:
        """A hex secret kept in ``hub/<name>`` (0600), created on first use: stable across restarts."""
        path = self.hub_dir / name
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            value = secrets.token_hex(nbytes)
            atomic_write_text(path, value + "\n", mode=0o600)
            return value


def venv_python() -> str:
    """The interpreter every spawned account runs (the workspace's own environment)."""
    return sys.executable


SERVER_MODULE = "paitient.server.singleuser"
"""The user's server, run as ``python -I -m SERVER_MODULE``: JupyterHub's single-user server without the
imports it does not need (:mod:`paitient.server.singleuser`). Its name is in every server's command line."""


def server_argv(python: str | None = None) -> list[str]:
    """The command of a user's server (``python``: the interpreter, by default :func:`venv_python`)."""
    return [python or venv_python(), "-I", "-m", SERVER_MODULE]


def default_proxy_command() -> str:
    """configurable-http-proxy installed by the setup script beside the venv (``<prefix>/proxy``)."""
    return str(Path(sys.prefix).parent / "proxy" / "node_modules" / ".bin" / "configurable-http-proxy")
