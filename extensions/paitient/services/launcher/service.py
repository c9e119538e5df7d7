"""The launcher service: one operation, ``start``, that starts a user's kernel in the sandbox root decides.

Request (from a user's server, over ``<state_dir>/gate/launcher.sock``)::

    {"op": "start", "args": {"connection_file": "<runtime dir>/kernel-<id>.json", "kernel": "python3",
                             "cwd": "<a folder in the home>"}}

Nothing else is accepted: a request with any other field (mounts, env, capabilities, argv, ...) is refused
with ``field_refused`` before anything is read. The caller is who ``SO_PEERCRED`` says: root and uids the
registry does not know are refused (``forbidden``). The connection file must lie directly in the caller's
runtime dir (``<home>/.local/share/jupyter/runtime``), be a regular file the caller owns (opened without
following links), and name ipc sockets in a folder of their own in that same dir (``path_refused``
otherwise). The kernel name picks a command of the launcher's own (``unknown_kernel`` otherwise); ``cwd``
outside the home becomes the home.

What the kernel gets is decided here from the registry and the site configuration only: the datasets of the
caller's projects (read-only), the home, the service sockets, the kernel's fixed environment, the seccomp
filter, every namespace, no capabilities, the site's rlimits; it runs as the caller's account with exactly
the groups of the caller's projects (:mod:`paitient.services.data.access`), no new privileges. The answer is
the kernel's pid and start time; the user's server signals and watches that process itself (it is the
user's own). Its parent is a keeper (:mod:`.keeper`, as the user) that ends it when the server that asked
for it is gone, and keeps it when the launcher ends.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import re
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from paitient.channel import BAD_REQUEST, FORBIDDEN, ChannelError, Peer
from paitient.config import SiteConfig
from paitient.registry import Member, Registry
from paitient.rules.sandbox import (
    Limits,
    PolicyError,
    SandboxPolicy,
    build_bwrap_argv,
    kernel_argv,
    kernel_env,
    prlimit_argv,
    python_roots,
    resolve_datasets,
    user_runtime_dir,
)
from paitient.rules.seccomp import seccomp_program
from paitient.services.data import access
from paitient.services.kit.access import SOCKET_MODE, workspace_group
from paitient.services.kit.channel import ChannelServer
from paitient.services.launcher import socket_path

FIELD_REFUSED = "field_refused"
"""The request carries a field the launcher does not take (it decides mounts, environment, command itself)."""
PATH_REFUSED = "path_refused"
"""The connection file or its socket folder is not where, or not what, the caller's own kernel would use."""
UNKNOWN_KERNEL = "unknown_kernel"

FIELDS = frozenset({"connection_file", "kernel", "cwd"})
CONNECTION_NAME = re.compile(r"^kernel-[A-Za-z0-9_-]{1,80}\.json\Z")
MAX_CONNECTION_BYTES = 64 * 1024
KEEPER = Path(__file__).with_name("keeper.py")
"""The kernel's parent (as the user): keeps it past the launcher's end, ends it with its server."""


def kernel_commands(python: str) -> dict[str, list[str]]:
    """Kernel name -> command (``{connection_file}`` replaced); the only kernels the launcher starts."""
    return {"python3": kernel_argv(python)}


def process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks after boot (None if gone or a zombie): with the pid, names one
    process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


class Launcher:
    """The decisions and the starting; :func:`serve` puts it on the socket."""

    def __init__(
        self,
        site: SiteConfig,
        registry: Registry,
        *,
        log: logging.Logger | None = None,
        bwrap: str = "/usr/bin/bwrap",
        prlimit: str = "/usr/bin/prlimit",
        python: str = sys.executable,
        seccomp: bool = True,
    ):
        self.site = site
        self.registry = registry
        self.log = log or logging.getLogger("paitient.services.launcher")
        self.bwrap = bwrap
        self.prlimit = prlimit
        self.python = python
        self.kernels = kernel_commands(python)
        self.seccomp = seccomp
        self.children: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def handlers(self) -> dict[str, Any]:
        return {"start": self.start}

    # -- the request ------------------------------------------------------------------------------

    def caller(self, peer: Peer) -> tuple[Member, pwd.struct_passwd]:
        if peer.is_root:
            raise ChannelError("root starts no researcher kernel; the launcher serves users' servers", FORBIDDEN)
        try:
            pw = pwd.getpwuid(peer.uid)
        except KeyError:
            raise ChannelError(f"uid {peer.uid} has no system account", FORBIDDEN) from None
        # by the account's name, then its uid: a uid an old, removed account had matches no entry
        member = self.registry.by_account(pw.pw_name)
        if member is None or member.uid != peer.uid:
            raise ChannelError(
                f"uid {peer.uid} ({pw.pw_name}) is not a workspace member; kernels are started for the registry's "
                "accounts only",
                FORBIDDEN,
            )
        return member, pw

    def check_fields(self, args: dict[str, Any]) -> None:
        extra = sorted(set(args) - FIELDS)
        if extra:
            raise ChannelError(
                f"the launcher takes only {', '.join(sorted(FIELDS))}; refused: {', '.join(map(str, extra))[:200]}. "
                "Mounts, environment, capabilities and the command are the launcher's own decisions",
                FIELD_REFUSED,
            )
        for key in FIELDS:
            if key in args and not isinstance(args[key], str):
                raise ChannelError(f"{key} must be a string", BAD_REQUEST)
        if not args.get("connection_file") or not args.get("kernel"):
            raise ChannelError("connection_file and kernel are required", BAD_REQUEST)

    def connection(self, path: str, uid: int, runtime_dir: str) -> tuple[str, str]:
        """(connection file, this kernel's socket folder), both checked to be the caller's own."""
        if (
            len(path) > 4096
            or not os.path.isabs(path)
            or os.path.normpath(path) != path
            or os.path.dirname(path) != runtime_dir
            or not CONNECTION_NAME.match(os.path.basename(path))
        ):
            raise ChannelError(
                f"the connection file must be {runtime_dir}/kernel-<id>.json, got {path[:300]!r}", PATH_REFUSED
            )
        if os.path.realpath(runtime_dir) != runtime_dir:
            raise ChannelError(f"the runtime dir {runtime_dir} may not pass through a symbolic link", PATH_REFUSED)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise ChannelError(f"cannot open the connection file {path}: {e.strerror}", PATH_REFUSED) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != uid or st.st_size > MAX_CONNECTION_BYTES:
                raise ChannelError(
                    f"the connection file {path} must be a regular file of yours, under 64 KiB", PATH_REFUSED
                )
            raw = os.read(fd, MAX_CONNECTION_BYTES + 1)
        finally:
            os.close(fd)
        try:
            info = json.loads(raw)
        except ValueError:
            raise ChannelError(f"the connection file {path} is not JSON", PATH_REFUSED) from None
        ip = info.get("ip") if isinstance(info, dict) else None
        if not isinstance(info, dict) or info.get("transport") != "ipc" or not isinstance(ip, str):
            raise ChannelError(
                "the kernel must use ipc sockets (transport ipc); the sandbox has no network", PATH_REFUSED
            )
        kernel_dir = os.path.dirname(ip)
        if os.path.normpath(kernel_dir) != kernel_dir or os.path.dirname(kernel_dir) != runtime_dir:
            raise ChannelError(f"the kernel's sockets must lie in a folder of their own in {runtime_dir}", PATH_REFUSED)
        try:
            kst = os.lstat(kernel_dir)
        except OSError:
            raise ChannelError(f"the socket folder {kernel_dir} does not exist", PATH_REFUSED) from None
        if not stat.S_ISDIR(kst.st_mode) or kst.st_uid != uid:
            raise ChannelError(f"the socket folder {kernel_dir} must be a folder of yours", PATH_REFUSED)
        return path, kernel_dir

    # -- the decision -----------------------------------------------------------------------------

    def projects(self, member: Member) -> dict[str, list[str]]:
        known = {p.name: p for p in self.site.projects}
        return {name: list(known[name].datasets) for name in member.projects if name in known}

    def groups(self, member: Member) -> list[int]:
        """The kernel's supplementary groups: the workspace's (the kernel reaches the ledger, airlock and jobs
        sockets mounted into its sandbox) and each of the member's projects' data groups."""
        gids = [workspace_group(self.site)]
        for project in sorted(self.projects(member)):
            try:
                gids.append(grp.getgrnam(access.group_name(self.site, project)).gr_gid)
            except KeyError:
                continue  # no data published for it yet: nothing to read
        return gids

    def limits(self) -> Limits:
        s = self.site.sandbox
        return Limits(s.memory_mb, s.max_processes, s.max_open_files, s.cpu_seconds)

    def policy(self, pw: pwd.struct_passwd, member: Member, connection_file: str, kernel_dir: str, cwd: str):
        home = pw.pw_dir
        runtime_dir = os.path.dirname(connection_file)
        work = os.path.normpath(cwd) if cwd and os.path.isabs(cwd) else home
        if not (work == home or work.startswith(home.rstrip("/") + "/")) or not os.path.isdir(work):
            work = home
        run_dir = str(self.site.run_dir)
        return SandboxPolicy(
            home=home,
            runtime_dir=runtime_dir,
            run_dir=run_dir,
            data=tuple(resolve_datasets(self.site.data_root, self.projects(member))),
            system_ro=("/usr", *python_roots()),
            extra_ro=("/sys/devices/system/cpu",),
            env=kernel_env(home, run_dir, runtime_dir),
            cwd=work,
            kernel_dir=kernel_dir,
            connection_file=connection_file,
        )

    def argv(
        self,
        pw: pwd.struct_passwd,
        member: Member,
        policy: SandboxPolicy,
        kernel: str,
        seccomp_fd: int | None,
        server: tuple[int, int] = (0, 0),
    ):
        command = self.kernels.get(kernel)
        if command is None:
            raise ChannelError(f"no kernel {kernel[:80]!r}; known: {', '.join(sorted(self.kernels))}", UNKNOWN_KERNEL)
        gids = self.groups(member)
        identity = [
            "setpriv",
            f"--reuid={pw.pw_uid}",
            f"--regid={pw.pw_gid}",
            f"--groups={','.join(map(str, gids))}" if gids else "--clear-groups",
            "--no-new-privs",
            "--",
        ]
        keeper = [
            self.python,
            "-I",
            "-S",  # standard library only: no site-packages, nothing its .pth files would load
            str(KEEPER),
            str(server[0]),
            str(server[1]),
            str(-1 if seccomp_fd is None else seccomp_fd),
            "--",
        ]
        return [
            *identity,
            *keeper,
            *prlimit_argv(self.limits(), self.prlimit),
            *build_bwrap_argv(policy, self.bwrap, seccomp_fd),
            *(policy.connection_file if part == "{connection_file}" else part for part in command),
        ]

    # -- the operation ----------------------------------------------------------------------------

    def start(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        self.check_fields(args)
        if fds:
            raise ChannelError("the launcher takes no file descriptors", FIELD_REFUSED)
        member, pw = self.caller(peer)
        server_start = process_start(peer.pid)
        if server_start is None:
            raise ChannelError("the asking process is gone", FORBIDDEN)
        runtime_dir = user_runtime_dir(pw.pw_dir)
        connection_file, kernel_dir = self.connection(args["connection_file"], pw.pw_uid, runtime_dir)
        try:
            policy = self.policy(pw, member, connection_file, kernel_dir, args.get("cwd", ""))
        except PolicyError as e:
            raise ChannelError(str(e), BAD_REQUEST) from None
        seccomp_fd = _seccomp_fd() if self.seccomp else None
        try:
            argv = self.argv(pw, member, policy, args["kernel"], seccomp_fd, (peer.pid, server_start))
            # The kernel's output goes to a file of root's, not to the launcher's own stderr: that is a pipe
            # of the hub's, and a kernel writing to it after the hub ended would die of SIGPIPE.
            logs = Path(self.site.state_dir) / "logs"
            logs.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(logs / f"kernels-{pw.pw_name}.log", "ab") as log:
                proc = subprocess.Popen(
                    argv,
                    env={"PATH": "/usr/bin:/bin"},
                    cwd="/",
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    pass_fds=() if seccomp_fd is None else (seccomp_fd,),
                    start_new_session=True,
                )
        finally:
            if seccomp_fd is not None:
                os.close(seccomp_fd)
        start = process_start(proc.pid)
        with self._lock:
            self.children[proc.pid] = proc
        threading.Thread(target=self._reap, args=(proc,), name=f"kernel-{proc.pid}", daemon=True).start()
        datasets = [m.dest.removeprefix("/data/") for m in policy.data]
        self.log.info("launcher: kernel pid %d for %s with datasets %s", proc.pid, member.account, datasets)
        return {"pid": proc.pid, "start": start, "datasets": datasets}

    def _reap(self, proc: subprocess.Popen) -> None:
        code = proc.wait()
        with self._lock:
            self.children.pop(proc.pid, None)
        self.log.info("launcher: kernel pid %d ended (%s)", proc.pid, code)


def _seccomp_fd() -> int:
    fd = os.memfd_create("paitient-seccomp", 0)
    os.write(fd, seccomp_program())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class LauncherServer(ChannelServer):
    """The launcher's socket: root:<workspace group> 0660 (``group`` None: root's group, for tests whose
    callers are root); who is served is then decided per request (:meth:`Launcher.caller`)."""

    def __init__(self, path: str | os.PathLike[str], launcher: Launcher, *, group: int | None = None):
        super().__init__(path, launcher.handlers(), name="launcher", mode=SOCKET_MODE, group=group)


def custom_scopes() -> dict[str, dict[str, str]]:
    return {}


def hub_service(site: SiteConfig, python: str, *, port: int = 0) -> dict[str, Any]:
    """The JupyterHub managed-service entry that runs the launcher (no web page)."""
    command = [python, "-m", "paitient.cli", "service", "launcher", f"--state-dir={site.state_dir}"]
    if site.source:
        command.append(f"--site={site.source}")
    return {"name": "launcher", "command": command, "display": False}


def serve(site: SiteConfig, logger: logging.Logger) -> None:
    """Serve the launcher's socket until SIGTERM/SIGINT; the kernels it started outlive it (a hub restart
    keeps researchers' kernels), each ending with its server."""
    from paitient.services.kit.process import StopSignal

    socket_path(site).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    launcher = Launcher(site, Registry.for_state_dir(site.state_dir), log=logger)
    server = LauncherServer(socket_path(site), launcher, group=workspace_group(site))
    stop = StopSignal()
    server.start_in_thread()
    logger.info("launcher: listening on %s", server.path)
    try:
        stop.wait()
    finally:
        # the kernels stay: each has its keeper, which ends it with its server
        server.shutdown()
        server.server_close()
