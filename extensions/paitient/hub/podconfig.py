"""The configuration of a user's server in a Kubernetes pod, written by the pod's init container.

Process: ``python -I -m paitient.hub.podconfig``, the command of the init container ``server-config`` of a
user's pod (:mod:`paitient.hub.kubernetes`). User: the pod's uid, never root. Trusted for: writing the
server's configuration before the server starts.

On a host the spawner (root) writes the server's policy into root-owned folders
(:func:`paitient.hub.serverconfig.write_user_server_config`). In a pod the hub cannot write files, so it
renders the same configuration (:func:`pod_server_config`, the host's :func:`server_config_at` with the pod's
places) into the init container's arguments, which nobody in the pod can change. The init container writes
it with the host's writer (:func:`write_server_files`) into an in-memory volume that the server's container
mounts read-only at :data:`JUPYTER` and the kernels' container does not mount at all; the server's
``JUPYTER_CONFIG_DIR`` and ``JUPYTER_DATA_DIR`` point there. The init container mounts neither the home nor
any data: nothing of the home decides the server's policy.

The writer checks what it is given: every place the configuration names must be the pod's
(:func:`pod_places`: the launcher at ``/run/paitient/launcher.sock``, the kernel spec in the volume, the
server's own files in :data:`STATE`), and it writes nowhere a kernel's sandbox binds.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from traitlets import Unicode, default
from traitlets.config import Application

from paitient import __version__
from paitient.config import SiteConfig
from paitient.hub.serverconfig import ServerPlaces, placed_settings, server_config_at, write_server_files
from paitient.services.launcher import pod as launcher

MODULE = "paitient.hub.podconfig"
JUPYTER = "/etc/paitient/jupyter"
"""The server's configuration volume (an in-memory emptyDir): ``config/`` is its ``JUPYTER_CONFIG_DIR``,
``data/`` its ``JUPYTER_DATA_DIR``. Written by the init container, read-only in the server's container."""
CONFIG_DIR = f"{JUPYTER}/config"
DATA_DIR = f"{JUPYTER}/data"
STATE = "/var/lib/paitient/server"
"""What the server writes itself (JupyterLab's user settings and workspaces, the notary's key and
signatures): a volume of the server's container alone, outside the home."""
EGRESS_SOCKET = launcher.EGRESS_SOCKET
"""Where the server's egress gate asks: the pod's relay serves it, for the server alone."""

KERNEL_REACHABLE = (launcher.HOME, launcher.DATA, launcher.SOCKETS)
"""Folders the kernels' container mounts (and a kernel's sandbox binds some of): the writer writes in none."""


class PodConfigError(ValueError):
    """The init container cannot write the server's configuration as given; the message says what to fix."""


def pod_places() -> ServerPlaces:
    """Where things are in a user's pod (the mounts :mod:`paitient.hub.kubernetes` gives the containers)."""
    return ServerPlaces(
        home=launcher.HOME,
        data_dir=DATA_DIR,
        state_dir=STATE,
        launcher_socket=launcher.SOCKET,
        egress_socket=EGRESS_SOCKET,
        data_root=launcher.DATA,
        run_dir=launcher.RUN_DIR,
    )


def pod_server_config(site: SiteConfig, projects: tuple[str, ...]) -> dict[str, Any]:
    """The hub's side: the server's configuration for a user in ``projects``, with the pod's places."""
    return server_config_at(site, projects, pod_places())


def pod_config_argv(python: str, config: dict[str, Any]) -> list[str]:
    """The init container's command: this module, the volumes it writes, and the configuration."""
    return [
        python,
        "-I",
        "-m",
        MODULE,
        f"--into={JUPYTER}",
        f"--state={STATE}",
        "--server-config=" + json.dumps(config, sort_keys=True, separators=(",", ":")),
    ]


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def check_folder(what: str, option: str, path: str) -> None:
    if not path:
        raise PodConfigError(
            f"--{option} is required: the folder of the {what}; the hub writes it into the pod's manifest"
        )
    if not os.path.isabs(path) or os.path.normpath(path) != path:
        raise PodConfigError(f"--{option} must be an absolute, normal path, got {path!r}")
    for folder in KERNEL_REACHABLE:
        if _inside(path, folder) or _inside(folder, path):
            raise PodConfigError(
                f"--{option}={path} meets {folder}, which the kernels' container mounts: the {what} must be "
                "a volume of its own that no kernel reaches"
            )


def parse_config(text: str) -> dict[str, Any]:
    """The configuration the hub rendered, checked: a JSON object whose every place is the pod's."""
    if not text:
        raise PodConfigError(
            "--server-config is required: the server's configuration as JSON, which the hub renders from the "
            "site file and the user into the pod's manifest"
        )
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise PodConfigError(f"--server-config is not JSON: {e}") from None
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise PodConfigError("--server-config must be a JSON object of sections (ServerApp, ...) of settings")
    for section, settings in placed_settings(pod_places()).items():
        for key, expected in settings.items():
            got = config.get(section, {}).get(key)
            if got != expected:
                raise PodConfigError(
                    f"--server-config sets {section}.{key} to {got!r}, not the pod's {expected!r}: the server's "
                    "configuration may name no place but the pod's own"
                )
    return config


def write_pod_config(into: str, state: str, server_config: str) -> None:
    """Check the arguments, then write the configuration into ``into`` (``config/``, ``data/``) and make the
    folders the server writes in ``state``."""
    check_folder("server's configuration volume", "into", into)
    check_folder("server's own files", "state", state)
    if _inside(into, state) or _inside(state, into):
        raise PodConfigError(f"--into={into} and --state={state} must be two folders apart")
    config = parse_config(server_config)
    if not Path(state).is_dir():
        raise PodConfigError(f"--state={state} is not a folder: the manifest mounts the volume server-state there")
    # the volume's own folder is the runtime's (an emptyDir: root's and the fsGroup's, 2777), which the pod's
    # uid may not chmod; the folders in it are the user's alone
    for d in (Path(state) / "lab", Path(state) / "notary"):
        d.mkdir(mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)
    write_server_files(config, Path(into) / "config", Path(into) / "data")


class PodConfigApp(Application):
    """``python -I -m paitient.hub.podconfig``: write the server's configuration, then exit."""

    name = "paitient-pod-config"
    version = __version__
    description = (
        "Writes the configuration of a user's server in a Kubernetes pod (the pod's init container), from the "
        "arguments the hub rendered into the pod's manifest."
    )

    into = Unicode("", help="The server's configuration volume: config/ and data/ are written there.").tag(config=True)
    state = Unicode("", help="The server's own volume: the folders it writes itself are made there.").tag(config=True)
    server_config = Unicode("", help="The server's configuration, as the hub rendered it (JSON).").tag(config=True)

    aliases = {
        "into": "PodConfigApp.into",
        "state": "PodConfigApp.state",
        "server-config": "PodConfigApp.server_config",
        "log-level": "Application.log_level",
    }

    @default("log_level")
    def _log_level_default(self) -> int:
        return logging.INFO

    def start(self) -> None:
        try:
            write_pod_config(self.into, self.state, self.server_config)
        except PodConfigError as e:
            print(f"{self.name}: {e}", file=sys.stderr)
            self.exit(2)
            return
        self.log.info("server configuration written to %s", self.into)


def main(argv: list[str] | None = None) -> None:
    PodConfigApp.launch_instance(argv)


if __name__ == "__main__":
    main()
