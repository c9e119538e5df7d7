"""The configuration of one user's server, written by the spawner (as root) before the server starts.

The server reads its policy only from root-owned places: the spawner points ``JUPYTER_CONFIG_DIR`` and
``JUPYTER_DATA_DIR`` at ``<state_dir>/users/<account>/jupyter/{config,data}`` (root-owned 0755, files
0644) and starts ``python -I -m paitient.server.singleuser`` (JupyterHub's single-user server) with the
environment of :func:`user_server_env`.
Nothing under the user's home (``~/.jupyter``, ``~/.local/share/jupyter``, ``~/.ipython/kernels``,
user site-packages) is read for policy.

:func:`server_config_at` is the pure part (site + projects + where things are -> config dict);
:func:`write_server_files` writes a config, the kernel spec, the JupyterLab page config and setting overrides,
and the ``migrated`` marker. On a host :func:`write_user_server_config` does both with the host's places; in a
Kubernetes pod the hub renders the config with the pod's places and the pod's init container writes it
(:mod:`paitient.hub.podconfig`).
"""

from __future__ import annotations

import os
import pwd
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paitient.config import SiteConfig
from paitient.fsutil import atomic_write_json, atomic_write_text, hand_over_folder, open_folder
from paitient.registry import Member
from paitient.rules.sandbox import kernel_argv, user_runtime_dir
from paitient.services import egress, launcher

KERNEL_NAME = "python3"
DISPLAY_NAME = "Python 3 (sandbox)"

# JupyterLab plugins whose commands download or export (ids as shipped in JupyterLab 4.6), and the
# terminal UI. The server refuses the routes behind them anyway; this removes the buttons.
DISABLED_LAB_PLUGINS: tuple[str, ...] = (
    "@jupyterlab/docmanager-extension:download",
    "@jupyterlab/filebrowser-extension:download",
    "@jupyterlab/filebrowser-extension:open-browser-tab",
    "@jupyterlab/notebook-extension:export",
    "@jupyterlab/terminal-extension",
    "@jupyterlab/extensionmanager-extension",
)

# Defaults of JupyterLab settings for every user (their own settings may still change them). The news
# question ("Would you like to get notified about official Jupyter news?") comes up while fetchNews is
# "none"; the server could not fetch news anyway (LabApp.news_url is unset below).
LAB_SETTING_OVERRIDES: dict[str, dict[str, Any]] = {
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
    # closing a notebook ends its kernel: its memory, its privacy-budget reservation and its place among the
    # account's [sandbox] kernels_per_account are free at once, not an idle_timeout later
    "@jupyterlab/notebook-extension:tracker": {"kernelShutdown": True},
}


def kernel_spec(python: str = sys.executable) -> dict[str, Any]:
    """The one kernel spec of the workspace: IPython in the sandbox, interrupted by message."""
    return {
        "argv": kernel_argv(python),
        "display_name": DISPLAY_NAME,
        "language": "python",
        "interrupt_mode": "message",
        "env": {},
        "metadata": {
            "debugger": False,
            "kernel_provisioner": {"provisioner_name": "paitient-sandbox"},
        },
    }


def project_datasets(site: SiteConfig, projects: tuple[str, ...]) -> dict[str, list[str]]:
    """Project -> its datasets, for ``projects`` (those the site no longer lists are left out)."""
    known = {p.name: p for p in site.projects}
    return {name: list(known[name].datasets) for name in projects if name in known}


def member_datasets(site: SiteConfig, member: Member) -> dict[str, list[str]]:
    """Project -> datasets the member may read (projects the site no longer lists are left out)."""
    return project_datasets(site, member.projects)


def idle_culling(idle_timeout: int) -> dict[str, Any]:
    """Kernel culling: a kernel idle this many seconds is shut down, connected browser or not (0: never).

    An idle kernel holds memory and, for a DP run, a budget reservation; a forgotten one must not do so
    for days."""
    if idle_timeout <= 0:
        return {}
    return {
        "cull_idle_timeout": idle_timeout,
        "cull_interval": max(10, min(300, idle_timeout // 4)),
        "cull_connected": True,
        "cull_busy": False,
    }


def lab_settings_dir(data_dir: str | os.PathLike[str]) -> str:
    """JupyterLab's application settings directory for the server whose ``JUPYTER_DATA_DIR`` is
    ``data_dir`` (root-owned): where ``overrides.json`` sets the defaults of :data:`LAB_SETTING_OVERRIDES`.

    JupyterLab reads its setting overrides (and a lowest-priority ``page_config.json``) from there instead
    of from the Python environment's ``share/jupyter/lab/settings``; the page configuration that matters
    is in the config dir's ``labconfig``."""
    return os.path.join(data_dir, "lab", "settings")


@dataclass(frozen=True)
class ServerPlaces:
    """Where a user's server finds what its configuration names: the home, its Jupyter data dir (the kernel
    spec, JupyterLab's overrides), the folder it writes itself, the launcher's and the egress gate's sockets,
    and the data root and services' folder its kernels get."""

    home: str
    data_dir: str
    state_dir: str
    launcher_socket: str
    egress_socket: str
    data_root: str
    run_dir: str

    @classmethod
    def on_host(cls, site: SiteConfig, home: str, data_dir: str, state_dir: str) -> ServerPlaces:
        """A host's: the sockets in ``<state_dir>/gate``, the site's data root and run dir."""
        return cls(
            home=str(home),
            data_dir=str(data_dir),
            state_dir=str(state_dir),
            launcher_socket=str(launcher.socket_path(site)),
            egress_socket=str(egress.socket_path(site)),
            data_root=str(site.data_root),
            run_dir=str(site.run_dir),
        )


def placed_settings(places: ServerPlaces) -> dict[str, dict[str, Any]]:
    """Every setting of the server's configuration that names a place, and only those.

    ``state_dir`` is what the server itself writes, outside the home and so out of the kernels' reach:
    JupyterLab's user settings and workspaces (whose APIs send files back as they are) and the notebook
    signing key and signatures (which decide whether a notebook's HTML and scripts are trusted).
    """
    lab_dir = os.path.join(places.state_dir, "lab")
    return {
        "ServerApp": {"root_dir": places.home},
        # Every byte to the browser passes the egress gate, which asks the root-side egress service.
        "PaitientServerExtension": {"egress_socket": places.egress_socket},
        "SandboxKernelSpecManager": {"sandbox_kernel_dirs": [os.path.join(places.data_dir, "kernels")]},
        "SandboxProvisioner": {
            # the launcher builds the sandbox and starts the kernel; what follows only describes it
            "launcher_socket": places.launcher_socket,
            "data_root": places.data_root,
            "run_dir": places.run_dir,
        },
        "CappedWebsocketConnection": {"audit_run_dir": places.run_dir},
        "NotebookNotary": {"data_dir": os.path.join(places.state_dir, "notary")},
        "LabApp": {
            "user_settings_dir": os.path.join(lab_dir, "user-settings"),
            "workspaces_dir": os.path.join(lab_dir, "workspaces"),
            "app_settings_dir": lab_settings_dir(places.data_dir),
        },
    }


def server_config_at(site: SiteConfig, projects: tuple[str, ...], places: ServerPlaces) -> dict[str, Any]:
    """The traitlets configuration (as JSON) of the server of a user in ``projects``, with ``places``."""
    limits = site.egress_for_user(projects)
    config: dict[str, Any] = {
        "ServerApp": {
            "jpserver_extensions": {
                "paitient.server": True,
                "jupyterlab": True,
                "jupyter_server_terminals": False,
                "jupyter_lsp": False,
            },
            "terminals_enabled": False,
            # The paitient extension refuses a server that is not locked down; that must stop the server.
            "reraise_server_extension_failures": True,
            "kernel_manager_class": "paitient.server.kernels.SandboxMappingKernelManager",
            "kernel_spec_manager_class": "paitient.server.kernels.SandboxKernelSpecManager",
            "contents_manager_class": "paitient.server.contents.ConfinedContentsManager",
            "kernel_websocket_connection_class": "paitient.server.websocket.CappedWebsocketConnection",
            # With no kernels left and nobody active, the server stops itself (0: never).
            "shutdown_no_activity_timeout": site.server.idle_timeout,
        },
        "ContentsManager": {
            "allow_hidden": False,
            "files_handler_class": "paitient.server.handlers.BlockedFilesHandler",
        },
        "ConfinedContentsManager": {
            "max_content_bytes": site.server.contents_cap_bytes,
            "max_text_bytes": limits.contents_bytes,
        },
        "PaitientServerExtension": {
            "fail_closed_bytes": limits.fail_closed_bytes,
            "unchecked_bytes": limits.unchecked_bytes,
        },
        "KernelManager": {"transport": "ipc"},
        "KernelProvisionerFactory": {"default_provisioner_name": "paitient-sandbox"},
        "KernelSpecManager": {
            "ensure_native_kernel": False,
            "allowed_kernelspecs": [KERNEL_NAME],
        },
        "MappingKernelManager": {"default_kernel_name": KERNEL_NAME, **idle_culling(site.server.idle_timeout)},
        "SandboxProvisioner": {
            "projects": project_datasets(site, projects),
            "memory_mb": site.sandbox.memory_mb,
            "max_processes": site.sandbox.max_processes,
            "max_open_files": site.sandbox.max_open_files,
            "cpu_seconds": site.sandbox.cpu_seconds,
            "tmp_bytes": site.sandbox.tmp_bytes,
        },
        "CappedWebsocketConnection": {
            "output_cap_message_bytes": site.server.output_cap_message_bytes,
            "output_cap_execution_bytes": site.server.output_cap_execution_bytes,
        },
        "LabApp": {
            # The server's network reaches only the hub's API (paitient.hub.servernet); should that ever
            # widen, nothing here may make it fetch a URL or query an index on a user's behalf either (an
            # extension search carries whatever text the user typed).
            "extension_manager": "readonly",
            "news_url": None,
            "check_for_updates_class": "jupyterlab.handlers.announcements.NeverCheckForUpdate",
        },
    }
    for section, settings in placed_settings(places).items():
        config.setdefault(section, {}).update(settings)
    return config


def server_config(site: SiteConfig, member: Member, home: str, data_dir: str, state_dir: str) -> dict[str, Any]:
    """The traitlets configuration (as JSON) of ``member``'s server on a host (:meth:`ServerPlaces.on_host`)."""
    return server_config_at(site, member.projects, ServerPlaces.on_host(site, home, data_dir, state_dir))


def page_config() -> dict[str, Any]:
    return {"disabledExtensions": {plugin: True for plugin in DISABLED_LAB_PLUGINS}}


def user_server_env(config_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str], home: str) -> dict[str, str]:
    """Jupyter variables the spawner sets for the user's server (on top of the hub's own ones).

    ``JUPYTER_PREFER_ENV_PATH=0`` puts the root-owned config dir ahead of the Python environment's.
    """
    return {
        "JUPYTER_CONFIG_DIR": str(config_dir),
        "JUPYTER_DATA_DIR": str(data_dir),
        "JUPYTER_RUNTIME_DIR": user_runtime_dir(home),
        "JUPYTER_PREFER_ENV_PATH": "0",
        "JUPYTER_PLATFORM_DIRS": "0",
        "PYTHONNOUSERSITE": "1",
    }


def _root_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o755)
    if os.geteuid() == 0:
        os.chown(path, 0, 0)


def write_server_files(
    config: dict[str, Any], dest_config_dir: str | os.PathLike[str], dest_data_dir: str | os.PathLike[str]
) -> None:
    """Publish a server's configuration: ``config`` as ``jupyter_server_config.json``, the workspace's kernel
    spec (the only one: others in the data dir are removed), JupyterLab's page config and setting overrides,
    and jupyter_core's ``migrated`` marker.

    Files 0644 in folders 0755, each published atomically; root's when root writes them (on a host), the
    pod's uid's in a pod, where the server's container mounts them read-only.
    """
    config_dir, data_dir = Path(dest_config_dir), Path(dest_data_dir)
    settings_dir = Path(lab_settings_dir(data_dir))
    for d in (config_dir, config_dir / "labconfig", data_dir, data_dir / "kernels", settings_dir.parent, settings_dir):
        _root_dir(d)
    kernels = data_dir / "kernels"
    for old in kernels.iterdir():
        if old.name != KERNEL_NAME:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    spec_dir = kernels / KERNEL_NAME
    if spec_dir.is_symlink():
        spec_dir.unlink()
    _root_dir(spec_dir)
    atomic_write_json(spec_dir / "kernel.json", kernel_spec(), mode=0o644)
    atomic_write_json(config_dir / "jupyter_server_config.json", config, mode=0o644)
    atomic_write_json(config_dir / "labconfig" / "page_config.json", page_config(), mode=0o644)
    atomic_write_json(settings_dir / "overrides.json", LAB_SETTING_OVERRIDES, mode=0o644)
    # jupyter_core writes this marker on first start; in a folder the server cannot write, that would fail.
    atomic_write_text(config_dir / "migrated", "paitient\n", mode=0o644)


def write_user_server_config(
    site: SiteConfig,
    member: Member,
    dest_config_dir: str | os.PathLike[str],
    dest_data_dir: str | os.PathLike[str],
) -> None:
    """Write ``member``'s server configuration; the spawner calls this (as root) before every start.

    Files are root-owned 0644 in root-owned 0755 folders, published atomically (:func:`write_server_files`).
    Next to the config dir, ``state`` (the user's, 0700) is where the server writes (see
    :func:`placed_settings`).
    """
    config_dir = Path(dest_config_dir)
    pw = pwd.getpwnam(member.account)
    state_dir = config_dir.parent / "state"
    # The account owns ``state`` and may have put links in it: each folder is changed through a descriptor
    # opened without following one (a chown by path through state/lab -> /etc would hand it /etc).
    with open_folder(config_dir.parent) as user_dir:
        state = hand_over_folder(user_dir, "state", pw.pw_uid, pw.pw_gid)
        try:
            for name in ("lab", "notary"):
                os.close(hand_over_folder(state, name, pw.pw_uid, pw.pw_gid))
        finally:
            os.close(state)
    config = server_config(site, member, pw.pw_dir, str(dest_data_dir), str(state_dir))
    write_server_files(config, config_dir, dest_data_dir)
