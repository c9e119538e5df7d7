"""Spawners: each researcher's server runs as their own system account, configured from root-owned places.

``PaitientLocalSpawner`` extends JupyterHub's LocalProcessSpawner: before the server starts it makes sure
the user's system account exists (created on first sign-in, see :mod:`paitient.hub.accounts`), records
who the account belongs to and which projects it may use (the registry the services read), adds the
example notebooks the home lacks (:mod:`paitient.hub.examples`), and writes the server's configuration
into a root-owned directory the user can read but not change. The server runs ``python -I`` from the
workspace environment with a minimal environment: nothing the user controls (PYTHONPATH, user
site-packages, ~/.jupyter) can change its policy. It runs behind :mod:`paitient.hub.servernet`, in a network
namespace of its own that reaches the hub's API and nothing else. Its API token carries only what a server needs
(``server_token_scopes``): never the user's token scopes.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from jupyterhub.spawner import LocalProcessSpawner
from jupyterhub.utils import random_port
from tornado import web
from traitlets import Bool, HasTraits, Unicode, default

from paitient import config as site_config
from paitient.hub.paths import HubPaths, server_argv, venv_python
from paitient.hub.serverconfig import user_server_env
from paitient.registry import Member
from paitient.services.kit.access import workspace_group

if TYPE_CHECKING:
    from jupyterhub.user import User


ACCOUNT_UNAVAILABLE = (
    "Your workspace server cannot start: the workspace could not set up the system account your work runs as. "
    "The workspace's operator has been told what to do; please contact them and try again later."
)


def account_unavailable(error: Exception) -> web.HTTPError:
    """The error page a researcher sees when no account could be made (503: the operator must act, it is not
    the researcher's doing). The operator's details stay in the hub's log."""
    e = web.HTTPError(503, "system account unavailable: %s", str(error)[:300])
    e.jupyterhub_message = ACCOUNT_UNAVAILABLE  # type: ignore[attr-defined]
    return e


SERVER_TOKEN_SCOPES = ("users:activity!user", "access:servers!server")
"""The scopes of a user's server's API token, on every spawner: what JupyterHub's ``server`` role holds
(report activity, admit the owner), named here so that no change of roles gives the server's token (readable
by the user's own processes) the user's scopes."""
SERVERNET = Path(__file__).with_name("servernet.py")
"""The root wrapper that gives each server its own network namespace (:mod:`paitient.hub.servernet`)."""


def server_command(
    account: str, groups: list[int], listen: tuple[str, int], hub_api: str, command: list[str]
) -> list[str]:
    """The command the hub (root) runs for a user's server: :mod:`paitient.hub.servernet` in front of it.

    The wrapper starts ``command`` as ``account`` with exactly ``groups`` as supplementary groups (the
    workspace's group, which may reach the services' sockets), in a network namespace of its own that reaches
    the hub's API (``hub_api``, its URL) and nothing else; the hub and the proxy reach the server at
    ``listen`` on the host.

    Not the account's groups from /etc/group: those include its projects' data groups
    (:mod:`paitient.services.data.access`), and the server runs outside the sandbox. Its kernels get those
    groups from the root-side launcher; the server itself reads no dataset, its own projects' included.
    """
    api = urlsplit(hub_api)
    if api.hostname != "127.0.0.1" or api.port is None:
        raise ValueError(f"the hub's API must listen on 127.0.0.1 with an explicit port, not {hub_api!r}")
    return [
        venv_python(),
        "-I",
        "-S",  # standard library only: no site-packages, nothing its .pth files would load
        str(SERVERNET),
        f"--account={account}",
        f"--groups={','.join(str(g) for g in groups)}",
        f"--listen={listen[0]}:{listen[1]}",
        f"--hub-api=127.0.0.1:{api.port}",
        "--",
        *command,
    ]


class SiteSpawnerMixin(HasTraits):
    """Access to the site configuration the hub was started with (set by :func:`paitient.hub.hubconfig.configure`)."""

    site_file = Unicode("", help="Site configuration file; empty for the embedded default.").tag(config=True)
    site_state_dir = Unicode("", help="State directory override, as given to `paitient up`.").tag(config=True)

    _site: site_config.SiteConfig | None = None

    user: User
    """The hub user the spawner serves: set by JupyterHub's Spawner, which every subclass also extends."""

    @property
    def site(self) -> site_config.SiteConfig:
        if self._site is None:
            overrides = {"workspace": {"state_dir": self.site_state_dir}} if self.site_state_dir else None
            self._site = site_config.load(self.site_file or None, overrides=overrides)
        return self._site

    def member_groups(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(projects, roles) of the hub user, as the authenticator last synchronised them from the directory."""
        known = {p.name for p in self.site.projects}
        projects = tuple(sorted(g.name for g in self.user.groups if g.name in known))
        roles = tuple(sorted(r.name for r in self.user.roles if r.name in ("researcher", "steward", "admin")))
        return projects, roles


class WorkspaceServerMixin(SiteSpawnerMixin):
    """What every spawner of a researcher's server does, whatever runs the server (a local process, a
    container): the account, the examples, the root-owned configuration, the server's token scopes, its
    environment, and the audit records of its start and stop."""

    account = Unicode("", help="System account the server runs as (set at start; kept across hub restarts).")

    provide_examples = Bool(
        True,
        help="Add the example notebooks a user's home lacks before each server start (never replacing a file).",
    ).tag(config=True)

    @default("default_url")
    def _default_url_default(self) -> str:
        return "/lab"

    @default("server_token_scopes")
    def _server_token_scopes_default(self) -> list[str]:
        return list(SERVER_TOKEN_SCOPES)

    @default("env_keep")
    def _env_keep_default(self) -> list[str]:
        # Nothing that changes how Python or the loader behaves (PYTHONPATH, LD_*): PATH is set below.
        return ["LANG", "LC_ALL"]

    @default("disable_user_config")
    def _disable_user_config_default(self) -> bool:
        return True

    # -- state across hub restarts -------------------------------------------------------------

    def load_state(self, state: dict) -> None:
        super().load_state(state)  # type: ignore[misc]  # the Spawner this mixes into
        self.account = state.get("account", "")

    def get_state(self) -> dict:
        state: dict = super().get_state()  # type: ignore[misc]
        if self.account:
            state["account"] = self.account
        return state

    # -- start ----------------------------------------------------------------------------------

    def _prepare(self) -> Member:
        """Blocking part of the start: account, registry, root-owned server configuration."""
        from paitient.hub.accounts import ensure_account
        from paitient.hub.serverconfig import write_user_server_config

        projects, roles = self.member_groups()
        member = ensure_account(self.site, self.user.name, projects=projects, roles=roles)
        if self.provide_examples:
            self._provide_examples(member.account)
        paths = HubPaths.of(self.site)
        user_dir = paths.user_dir(member.account)
        config_dir, data_dir = user_dir / "config", user_dir / "data"
        for d in (user_dir, config_dir, data_dir):
            d.mkdir(parents=True, exist_ok=True)
        # The account reads its own folder through its own group; other accounts cannot enter it (the server
        # configuration names the account's projects and datasets). Root's either way: nothing in it is theirs
        # to change.
        os.chown(user_dir, 0, pwd.getpwnam(member.account).pw_gid)
        os.chmod(user_dir, 0o750)
        for d in (config_dir, data_dir):
            os.chown(d, 0, 0)
            os.chmod(d, 0o755)
        write_user_server_config(self.site, member, config_dir, data_dir)
        return member

    def _provide_examples(self, account: str) -> None:
        from paitient.hub.examples import ExamplesError, provide

        pw = pwd.getpwnam(account)
        try:
            added = provide(pw.pw_dir, pw.pw_uid, pw.pw_gid)
        except (ExamplesError, OSError) as e:
            # the server is still worth starting; the operator learns why the examples are missing
            self.log.error("example notebooks not added to the home of %s: %s", account, e)  # type: ignore[attr-defined]
            return
        if added:
            self.log.info("added example notebooks to the home of %s: %s", account, ", ".join(added))  # type: ignore[attr-defined]

    async def _audit(self, action: str, outcome: str = "ok", **details) -> None:
        """Record what the spawner did (after the fact: a start, a stop, a failure); one the trail cannot take
        now waits for it (:mod:`paitient.hub.records`) instead of failing the start or the stop."""
        from paitient.hub import records

        await asyncio.to_thread(
            records.record,
            self.site,
            actor=self.user.name,
            action=action,
            object=self.account or self.user.name,
            outcome=outcome,
            details=details,
        )

    async def prepare_member(self) -> Member:
        """:meth:`_prepare` off the event loop; a failure is audited, and an account that cannot be made is
        the researcher's 503 page (the operator's remedy goes to the log and the audit trail)."""
        from paitient.hub.accounts import AccountError

        try:
            member = await asyncio.to_thread(self._prepare)
        except AccountError as e:
            self.log.error("no system account for %s: %s", self.user.name, e)  # type: ignore[attr-defined]
            await self._audit("server.spawn", "error", reason=f"{type(e).__name__}: {e}"[:500])
            raise account_unavailable(e) from None
        except Exception as e:
            await self._audit("server.spawn", "error", reason=f"{type(e).__name__}: {e}"[:500])
            raise
        self.account = member.account
        return member

    def server_env(self, env: dict[str, str]) -> dict[str, str]:
        """The server's environment: the account's identity, a fixed PATH, the root-owned Jupyter folders;
        nothing that changes how Python or the loader behaves."""
        pw = pwd.getpwnam(self.account)
        user_dir = HubPaths.of(self.site).user_dir(self.account)
        env.update(
            USER=pw.pw_name,
            LOGNAME=pw.pw_name,
            HOME=pw.pw_dir,
            SHELL=pw.pw_shell,
            PATH=f"{Path(venv_python()).parent}:/usr/local/bin:/usr/bin:/bin",
            PAITIENT_RUN_DIR=str(self.site.run_dir),
        )
        env.update(user_server_env(user_dir / "config", user_dir / "data", pw.pw_dir))
        for var in (
            "JUPYTER_PATH",
            "JUPYTER_CONFIG_PATH",
            "PYTHONPATH",
            "PYTHONSTARTUP",
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "PYTHONHOME",
        ):
            env.pop(var, None)
        return env


class PaitientLocalSpawner(WorkspaceServerMixin, LocalProcessSpawner):
    @default("cmd")
    def _cmd_default(self) -> list[str]:
        return server_argv()

    async def start(self):
        member = await self.prepare_member()
        log_path = HubPaths.of(self.site).log_dir / f"server-{member.account}.log"
        log = open(log_path, "ab", buffering=0)  # noqa: SIM115 - Popen duplicates it; closed below
        server = list(self.cmd)
        try:
            if self.port == 0:
                self.port = random_port()
            self.cmd = server_command(
                member.account,
                [workspace_group(self.site)],
                (self.ip or "127.0.0.1", self.port),
                self.hub.api_url,
                server,
            )
            self.popen_kwargs = {**self.popen_kwargs, "stdout": log, "stderr": subprocess.STDOUT}
            ip_port = await super().start()
        finally:
            self.cmd = server
            log.close()
        await self._audit(
            "server.spawn", uid=member.uid, pid=self.pid, projects=list(member.projects), roles=list(member.roles)
        )
        return ip_port

    async def stop(self, now: bool = False) -> None:
        pid = self.pid
        await super().stop(now=now)
        await self._audit("server.stop", pid=pid, now=now)

    def make_preexec_fn(self, name: str):
        # The wrapper (:func:`server_command`) runs as root: it makes the namespace, then drops to the account.
        return None

    def user_env(self, env: dict[str, str]) -> dict[str, str]:
        return self.server_env(env)
