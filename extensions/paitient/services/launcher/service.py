"""The host's launcher service: root decides what a kernel mounts, and starts it as the user.

The request, its checks and the sandbox are :mod:`.base`'s, shared with the pod's launcher (:mod:`.pod`).
What is the host's own: the caller is who ``SO_PEERCRED`` says, and must be an account of the registry
(root and uids the registry does not know are refused, ``forbidden``); the kernel gets the datasets of the
caller's projects in the site configuration, and runs as the caller's account with exactly the groups of
those projects (:mod:`paitient.services.data.access`) and the workspace's, no new privileges (``setpriv``).
Each account's kernels are scheduled as one, in a cpu control group of root's (:mod:`.cpu`), where the host
lets root make one. The kernel's output goes to a file of root's, through a pump that keeps the first
``[sandbox] kernel_log_bytes`` of it (:mod:`.pump`). The kernels it started stay when it ends (a hub restart keeps
researchers' kernels); each ends with its server.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from paitient.channel import FORBIDDEN, ChannelError, Peer
from paitient.config import SiteConfig
from paitient.registry import Member, Registry
from paitient.rules.sandbox import OOM_SCORE_ADJ, Limits, oom_first
from paitient.services.data import access
from paitient.services.kit.access import SOCKET_MODE, workspace_group
from paitient.services.kit.channel import ChannelServer
from paitient.services.kit.channel import Limits as ConnectionLimits
from paitient.services.launcher import cpu, socket_path
from paitient.services.launcher.base import BaseLauncher, Caller


class Launcher(BaseLauncher):
    """The host's launcher: callers from the registry, datasets from the site, identity by ``setpriv``."""

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
        cpu_groups: bool = True,
    ):
        s = site.sandbox
        super().__init__(
            data_root=site.data_root,
            run_dir=site.run_dir,
            limits=Limits(s.memory_mb, s.max_processes, s.max_open_files, s.cpu_seconds),
            log=log,
            bwrap=bwrap,
            prlimit=prlimit,
            python=python,
            seccomp=seccomp,
            tmp_bytes=s.tmp_bytes,
            kernels_per_account=s.kernels_per_account,
            cpu=cpu.find() if cpu_groups else None,
        )
        self.site = site
        self.registry = registry
        if cpu_groups and self.cpu is None:
            self.log.warning(
                "launcher: no cpu control group this process may write: kernels share the CPU per session, not "
                "per account (docs/operations.md, 'CPU per account')"
            )
        elif self.cpu is not None:
            self.log.info("launcher: each account's kernels share one cpu group under %s", self.cpu.base)
            self.cpu.sweep()  # what an earlier launcher left empty
        if not has_sys_resource():
            self.log.warning(
                "launcher: no CAP_SYS_RESOURCE: kernels start with oom_score_adj %d but may lower it", OOM_SCORE_ADJ
            )

    def caller(self, peer: Peer) -> Caller:
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
        projects = self.projects(member)
        return Caller(
            uid=pw.pw_uid,
            gid=pw.pw_gid,
            home=pw.pw_dir,
            name=pw.pw_name,
            projects=projects,
            groups=tuple(self.groups(projects)),
        )

    def projects(self, member: Member) -> dict[str, list[str]]:
        known = {p.name: p for p in self.site.projects}
        return {name: list(known[name].datasets) for name in member.projects if name in known}

    def groups(self, projects: dict[str, list[str]]) -> list[int]:
        """The kernel's supplementary groups: the workspace's (the kernel reaches the ledger, airlock and jobs
        sockets mounted into its sandbox) and each of the member's projects' data groups."""
        gids = [workspace_group(self.site)]
        for project in sorted(projects):
            try:
                gids.append(grp.getgrnam(access.group_name(self.site, project)).gr_gid)
            except KeyError:
                continue  # no data published for it yet: nothing to read
        return gids

    def identity(self, caller: Caller) -> list[str]:
        # choom as root: oom_score_adj 1000 and, written with CAP_SYS_RESOURCE, its floor too; the keeper,
        # bubblewrap and the kernel inherit both and cannot lower them. The OOM killer then takes a kernel
        # before any service (whatever its size), tmpfs and shared memory of a sandbox going with it.
        return [
            *oom_first(),
            "setpriv",
            f"--reuid={caller.uid}",
            f"--regid={caller.gid}",
            f"--groups={','.join(map(str, caller.groups))}" if caller.groups else "--clear-groups",
            "--no-new-privs",
            "--",
        ]

    @contextlib.contextmanager
    def output(self, caller: Caller) -> Iterator[IO[bytes] | None]:
        """A pipe whose other end a pump of root's (:mod:`.pump`) copies into ``<state_dir>/logs/kernels-
        <account>.log``, the first ``[sandbox] kernel_log_bytes`` of each kernel, dropping the rest. Not the
        file itself: a kernel would fill the state directory's disk (and the audit trail's with it). Not the
        launcher's own stderr: that is a pipe of the hub's, and a kernel writing to it after the hub ended would
        die of SIGPIPE; the pump is a process of its own and outlives the launcher as the kernel does."""
        cap = self.site.sandbox.kernel_log_bytes
        logs = Path(self.site.state_dir) / "logs"
        logs.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = logs / f"kernels-{caller.name}.log"
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size >= LOG_FILE_KERNELS * cap:
                os.replace(path, path.with_name(path.name + ".1"))
        read, write = os.pipe()
        try:
            with open(path, "ab") as log:
                pump = subprocess.Popen(
                    [self.python, "-I", "-S", str(PUMP), str(cap), caller.name],
                    env={"PATH": "/usr/bin:/bin"},
                    cwd="/",
                    stdin=read,
                    stdout=log,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
        except BaseException:
            os.close(write)
            raise
        finally:
            os.close(read)
        threading.Thread(target=pump.wait, name=f"pump-{pump.pid}", daemon=True).start()
        if self.cpu is not None:
            # the pump's copying is the kernel's doing: the account's CPU, not a session of its own
            try:
                self.cpu.place(pump.pid, caller.name)
            except (OSError, ValueError) as e:
                self.log.warning("launcher: cannot put the log pump of %s in its cpu group: %s", caller.name, e)
        with open(write, "wb", buffering=0) as out:
            yield out


CAP_SYS_RESOURCE = 24


def has_sys_resource() -> bool:
    """Whether this process may set the floor of an oom_score_adj (root in a container may not)."""
    try:
        with open("/proc/self/status") as f:
            caps = next(line for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caps.split()[1], 16) >> CAP_SYS_RESOURCE & 1)


LOG_FILE_KERNELS = 16
"""An account's kernel log is moved aside (``.log.1``) at a kernel's start once it holds this many kernels'
caps: with the kernels that run, what an account's kernels can put on the state directory's disk is bounded."""
PUMP = Path(__file__).with_name("pump.py")


class LauncherServer(ChannelServer):
    """The launcher's socket: root:<workspace group> 0660 (``group`` None: root's group, for tests whose
    callers are root); who is served is then decided per request (:meth:`Launcher.caller`)."""

    def __init__(self, path: str | os.PathLike[str], launcher: Launcher, *, group: int | None = None):
        super().__init__(
            path, launcher.handlers(), name="launcher", mode=SOCKET_MODE, group=group, limits=LAUNCHER_LIMITS
        )


LAUNCHER_LIMITS = ConnectionLimits(rate=20.0, burst=40, per_uid=8, total=256)
"""Per uid: 8 connections at once, 20 requests a second (bursts of 40); 256 connections at once in all (a
class opening its notebooks together). Without them a server's account could hold any number of the
launcher's threads, each waiting up to its timeout for a request line."""


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
