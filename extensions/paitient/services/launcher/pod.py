"""The pod's kernel launcher: the host launcher's request and sandbox, inside a user's Kubernetes pod.

Process: ``python -I -m paitient.services.launcher.pod``, the command of the pod's ``kernels`` container
(:mod:`paitient.hub.kubernetes`). User: the pod's uid, never root. Trusted for: the sandbox of the kernels of
this one pod. The user's server (container ``notebook``, same uid, same pod) sends the host launcher's
request (:mod:`.base`) over ``/run/paitient/launcher.sock``, a folder both containers mount and no sandbox
binds.

What differs from the host's launcher (:mod:`.service`), and only that:

- **who**: the caller must be the launcher's own uid by ``SO_PEERCRED`` (the containers of a pod share the
  kernel, so the peer's uid is vouched for); any other uid, root included, is refused (``forbidden``). The
  socket is 0600 besides.
- **which data**: the projects are the folders mounted under the data root (``/data/<project>``, one
  read-only volume per project of the user, which the hub chose when it wrote the pod's manifest); their
  published datasets are bound as on a host. Nothing else of the container is.
- **which identity**: none to take: the launcher already is the user, with the pod's groups
  (``supplementalGroups``: the user's projects'); no ``setpriv``, no registry.
- **the server**: the server's container has a pid namespace of its own, so the launcher does not see it
  (``SO_PEERCRED`` gives pid 0); a kernel then ends with its keeper or with the pod, not with the server.

The home, the data root, the service sockets' folder and the rlimits are options the hub writes into the
container's arguments; the launcher refuses a socket a kernel's sandbox would bind.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from traitlets import Bool, Float, Int, Unicode, default
from traitlets.config import Application

from paitient import __version__
from paitient.channel import FORBIDDEN, ChannelError, Peer
from paitient.config import NAME_RE
from paitient.config.limits import Sandbox
from paitient.config.sandboxtraits import sandbox_traits
from paitient.config.traits import site_trait
from paitient.rules.sandbox import Limits
from paitient.services import relay as pod_relay
from paitient.services.kit.channel import ChannelServer
from paitient.services.launcher.base import BaseLauncher, Caller

MODULE = "paitient.services.launcher.pod"
# The pod's places: one set, the relay's (it runs in this process and serves the sockets beside this one).
HOME, DATA, SOCKETS, RUN_DIR, EGRESS_SOCKET = (
    pod_relay.HOME,
    pod_relay.DATA,
    pod_relay.SOCKETS,
    pod_relay.RUN_DIR,
    pod_relay.EGRESS_SOCKET,
)
SOCKET = f"{SOCKETS}/launcher.sock"
SOCKET_MODE = 0o600


class PodLauncherError(ValueError):
    """The pod's launcher cannot start as configured; the message says what to fix."""


def launcher_argv(python: str = "python") -> list[str]:
    """The command of the pod's kernels container."""
    return [python, "-I", "-m", MODULE]


def mounted_projects(data_root: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Project -> dataset names, from the folders under ``data_root``: ``<root>/<project>/<dataset>``.

    Only folders count (no links), and only those with a valid project or dataset name; which of the
    datasets are published (``current``) :func:`~paitient.rules.sandbox.resolve_datasets` decides."""
    projects: dict[str, list[str]] = {}
    try:
        entries = list(os.scandir(data_root))
    except FileNotFoundError:
        return projects
    for project in entries:
        if not project.is_dir(follow_symlinks=False) or not NAME_RE.match(project.name):
            continue
        try:
            datasets = os.scandir(project.path)
        except PermissionError:
            continue  # a volume the pod's groups may not read: nothing of it for the kernel either
        with datasets:
            projects[project.name] = sorted(
                d.name for d in datasets if d.is_dir(follow_symlinks=False) and NAME_RE.match(d.name)
            )
    return projects


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


class PodLauncher(BaseLauncher):
    """The launcher of one pod: serves its own uid only, offers the projects mounted under ``data_root``."""

    watch_required = False

    def __init__(self, *, home: str, uid: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid()
        self.home = home
        if self.uid == 0:
            raise PodLauncherError(
                "refusing to run as root: bubblewrap's user namespace would keep root's file access. "
                "Run the kernels container as the pod's user (runAsUser)"
            )
        for what, path in (("home", home), ("data root", self.data_root), ("run dir", self.run_dir)):
            if not os.path.isabs(path) or os.path.normpath(path) != path:
                raise PodLauncherError(f"the {what} must be an absolute, normal path, got {path!r}")

    def check_socket(self, socket: str) -> None:
        """A kernel must not reach the launcher (a kernel cannot ask for more kernels): its socket may lie in
        nothing a sandbox binds."""
        socket = os.path.normpath(os.path.abspath(socket))
        for what, folder in (("home", self.home), ("data root", self.data_root), ("run dir", self.run_dir)):
            if _inside(socket, folder):
                raise PodLauncherError(
                    f"the launcher's socket {socket} lies in the {what} {folder}, which every kernel's sandbox "
                    f"binds; put it in a folder of its own ({SOCKETS})"
                )

    def admit(self, peer: Peer) -> None:
        """Refuse, before its request is read, every uid but the pod's (root is refused in :meth:`caller`)."""
        if peer.uid != self.uid:
            raise ChannelError(
                f"uid {peer.uid} is not this pod's uid {self.uid}; the launcher starts kernels for its own "
                "pod's server only",
                FORBIDDEN,
            )

    def caller(self, peer: Peer) -> Caller:
        self.admit(peer)
        return Caller(
            uid=self.uid,
            gid=self.gid,
            home=self.home,
            name=f"uid {self.uid}",
            projects=mounted_projects(self.data_root),
        )


class PodLauncherApp(Application):
    """``python -m paitient.services.launcher.pod``: serve the launcher's socket until SIGTERM."""

    name = "paitient-pod-launcher"
    version = __version__
    description = (
        "The kernel launcher of a user's pod: starts each kernel the pod's server asks for in bubblewrap, with "
        "the projects mounted under the data root. Runs as the pod's user."
    )

    socket = Unicode(SOCKET, help="The launcher's socket; in a folder no kernel's sandbox binds.").tag(config=True)
    home = Unicode(HOME, help="The user's home in the pod (both containers mount it here).").tag(config=True)
    data_root = Unicode(DATA, help="Where the pod mounts one read-only volume per project: <data_root>/<project>.").tag(
        config=True
    )
    run_dir = Unicode(RUN_DIR, help="Folder of the services' sockets, bound read-only into each sandbox.").tag(
        config=True
    )
    memory_mb, max_processes, max_open_files, cpu_seconds, tmp_bytes, bwrap_path, prlimit_path = sandbox_traits()
    kernels_per_account = site_trait(Sandbox, "kernels_per_account")
    seccomp = Bool(True, help="Load the workspace's seccomp filter into every kernel.").tag(config=True)
    gateway = Unicode(
        "",
        help="The services' gateway (host:port). Set: this process also runs the pod's relay "
        "(paitient.services.relay), serving the services' sockets in the run dir. Empty: no relay.",
    ).tag(config=True)
    token_file = Unicode(
        pod_relay.TOKEN_FILE, help="The pod's token, for the relay; in no folder a sandbox binds."
    ).tag(config=True)
    egress_socket = Unicode(
        EGRESS_SOCKET, help="The egress gate's socket the relay serves for the pod's server; empty: none."
    ).tag(config=True)
    gateway_ca = Unicode("", help="The certificate authority (PEM) of the gateway's TLS certificate.").tag(config=True)
    plain_tcp = Bool(False, help="The relay calls the gateway without TLS (the cluster encrypts).").tag(config=True)
    report_seconds = Float(10.0, help="How often the relay reports the pod's live processes.").tag(config=True)
    airlock_max_bytes = Int(512 << 20, help="The largest file the relay sends the airlock.").tag(config=True)

    aliases = {
        "socket": "PodLauncherApp.socket",
        "home": "PodLauncherApp.home",
        "data-root": "PodLauncherApp.data_root",
        "run-dir": "PodLauncherApp.run_dir",
        "memory-mb": "PodLauncherApp.memory_mb",
        "max-processes": "PodLauncherApp.max_processes",
        "max-open-files": "PodLauncherApp.max_open_files",
        "cpu-seconds": "PodLauncherApp.cpu_seconds",
        "tmp-bytes": "PodLauncherApp.tmp_bytes",
        "kernels-per-account": "PodLauncherApp.kernels_per_account",
        "gateway": "PodLauncherApp.gateway",
        "token-file": "PodLauncherApp.token_file",
        "egress-socket": "PodLauncherApp.egress_socket",
        "gateway-ca": "PodLauncherApp.gateway_ca",
        "report-seconds": "PodLauncherApp.report_seconds",
        "airlock-max-bytes": "PodLauncherApp.airlock_max_bytes",
        "log-level": "Application.log_level",
    }

    flags = {
        "plain-tcp": ({"PodLauncherApp": {"plain_tcp": True}}, "The relay calls the gateway without TLS."),
    }

    @default("log_level")
    def _log_level_default(self) -> int:
        return logging.INFO

    def make_launcher(self) -> PodLauncher:
        launcher = PodLauncher(
            home=self.home,
            data_root=self.data_root,
            run_dir=self.run_dir,
            limits=Limits(self.memory_mb, self.max_processes, self.max_open_files, self.cpu_seconds),
            log=self.log if isinstance(self.log, logging.Logger) else None,
            bwrap=self.bwrap_path,
            prlimit=self.prlimit_path,
            python=sys.executable,
            seccomp=self.seccomp,
            tmp_bytes=self.tmp_bytes,
            kernels_per_account=self.kernels_per_account,
        )
        launcher.check_socket(self.socket)
        return launcher

    def start(self) -> None:
        from paitient.services.kit.process import StopSignal

        relay = None
        try:
            launcher = self.make_launcher()
            if self.gateway:
                relay = pod_relay.relay_of(self)
        except (PodLauncherError, pod_relay.RelayError) as e:
            print(f"{self.name}: {e}", file=sys.stderr)
            self.exit(2)
            return
        Path(self.run_dir).mkdir(mode=0o755, parents=True, exist_ok=True)
        Path(self.socket).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        server = ChannelServer(
            self.socket, launcher.handlers(), name="pod launcher", mode=SOCKET_MODE, admit=launcher.admit
        )
        stop = StopSignal()
        server.start_in_thread()
        self.log.info("pod launcher: listening on %s for uid %d", server.path, launcher.uid)
        try:
            relayed = (
                []
                if relay is None
                else pod_relay.start_relay(relay, self.run_dir, self.report_seconds, lambda: stop.received)
            )
        except pod_relay.RelayError as e:
            server.shutdown()
            server.server_close()
            print(f"{self.name}: {e}", file=sys.stderr)
            self.exit(2)
            return
        try:
            stop.wait()
        finally:
            pod_relay.stop_relay(relayed)
            server.shutdown()
            server.server_close()
            # the kernels cannot outlive the container anyway; end them now, each with its sandbox
            launcher.stop_all()


def main(argv: list[str] | None = None) -> None:
    PodLauncherApp.launch_instance(argv)


if __name__ == "__main__":
    main()
