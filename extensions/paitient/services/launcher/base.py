"""What the host's and the pod's kernel launchers share: the request, its checks, the sandbox and its start.

Request (from a user's server, over the launcher's socket)::

    {"op": "start", "args": {"connection_file": "<runtime dir>/kernel-<id>.json", "kernel": "python3",
                             "cwd": "<a folder in the home>"}}

Nothing else is accepted: a request with any other field (mounts, env, capabilities, argv, ...) is refused
with ``field_refused`` before anything is read, and so are file descriptors. The connection file must lie
directly in the caller's runtime dir (``<home>/.local/share/jupyter/runtime``), be a regular file the
caller owns (opened without following links), and name ipc sockets in a folder of their own in that same
dir; ``cwd``, when given, must be a folder in the home (``path_refused`` otherwise). The kernel name picks
a command of the launcher's own (``unknown_kernel`` otherwise).

A launcher (:class:`BaseLauncher`) decides the rest from what it was configured with and whom
``SO_PEERCRED`` names: the datasets of the caller's projects (read-only), the home, the service sockets,
the kernel's fixed environment, the seccomp filter, every namespace, no capabilities, the rlimits. The
variants differ only in what they must (:meth:`BaseLauncher.caller`, :meth:`BaseLauncher.identity`,
:meth:`BaseLauncher.output`): the host's (:mod:`.service`) is root, knows the caller from the registry and
changes to its account; the pod's (:mod:`.pod`) runs as the pod's uid, serves that uid only and offers what
the pod has mounted.

An account runs at most ``kernels_per_account`` kernels at once; the next request is refused with
``kernel_limit``, naming how many run. They are counted from ``/proc`` (the keepers running as the account,
those a launcher that has since restarted started included) and from the launcher's own kernels still
starting, one request of an account at a time, so two requests at once cannot both take the last place.

The answer is the kernel's pid and start time, and a handle (``kernel``: random, the launcher's name for
it). Its parent is a keeper (:mod:`.keeper`) that ends it when the server that asked for it is gone (where
the launcher can see that server) and keeps it when the launcher ends. ``watched`` says whether the
launcher saw that server: when it did, the two share a pid namespace and the server watches and signals the
kernel by its pid; when it did not (a pod's server, in a container of its own), the pid means nothing to
the server, which asks the launcher instead, by the handle::

    {"op": "alive", "args": {"kernel": "<handle>"}}  ->  {"alive": true}
    {"op": "stop", "args": {"kernel": "<handle>"}}   ->  {"stopped": true}   (the keeper kills the kernel)

Only the uid that asked for a kernel may ask about it or stop it; a handle the launcher does not know (or a
kernel that has ended) is not alive, and stopping it does nothing.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from paitient.channel import BAD_REQUEST, FORBIDDEN, INTERNAL, ChannelError, Peer
from paitient.rules.sandbox import (
    TMP_BYTES,
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
from paitient.services.kit.process import process_start, process_uid
from paitient.services.launcher.cpu import CpuGroups

FIELD_REFUSED = "field_refused"
"""The request carries a field the launcher does not take (it decides mounts, environment, command itself)."""
PATH_REFUSED = "path_refused"
"""The connection file, its socket folder or the working folder is not where, or not what, the caller's own
kernel would use."""
UNKNOWN_KERNEL = "unknown_kernel"
KERNEL_LIMIT = "kernel_limit"
"""The caller's account already runs as many kernels as ``[sandbox] kernels_per_account`` allows."""

FIELDS = frozenset({"connection_file", "kernel", "cwd"})
HANDLE = re.compile(r"^[0-9a-f]{32}\Z")
CONNECTION_NAME = re.compile(r"^kernel-[A-Za-z0-9_-]{1,80}\.json\Z")
MAX_CONNECTION_BYTES = 64 * 1024
KEEPER = Path(__file__).with_name("keeper.py")
"""The kernel's parent (as the user): keeps it past the launcher's end, ends it with its server."""


def kernel_commands(python: str) -> dict[str, list[str]]:
    """Kernel name -> command (``{connection_file}`` replaced); the only kernels a launcher starts."""
    return {"python3": kernel_argv(python)}


@dataclass(frozen=True)
class Caller:
    """Whom a kernel is for, as the launcher decided it (never as the request says)."""

    uid: int
    gid: int
    home: str
    name: str
    """For the log: the account, or the uid."""
    projects: dict[str, list[str]] = field(default_factory=dict)
    """Project -> dataset names the kernel may read."""
    groups: tuple[int, ...] = ()
    """The kernel's supplementary groups, where the launcher sets them (the host's)."""


def check_fields(args: dict[str, Any]) -> None:
    """Refuse a request that carries anything but the three fields, or fields that are not strings."""
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


def check_connection(path: str, uid: int, runtime_dir: str) -> tuple[str, str]:
    """(connection file, this kernel's socket folder), both checked to be ``uid``'s own in ``runtime_dir``."""
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
    except (ValueError, RecursionError):
        raise ChannelError(f"the connection file {path} is not JSON", PATH_REFUSED) from None
    ip = info.get("ip") if isinstance(info, dict) else None
    if not isinstance(info, dict) or info.get("transport") != "ipc" or not isinstance(ip, str):
        raise ChannelError("the kernel must use ipc sockets (transport ipc); the sandbox has no network", PATH_REFUSED)
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


def work_dir(cwd: str, home: str) -> str:
    """The kernel's working folder: ``cwd`` if it is a folder in the home, the home when none is named (or the
    one named is gone). A ``cwd`` outside the home is refused: the server's files all lie in the home."""
    if not cwd:
        return home
    work = os.path.normpath(cwd)
    if not os.path.isabs(cwd) or not (work == home or work.startswith(home.rstrip("/") + "/")):
        raise ChannelError(f"cwd must be a folder in your home {home}, got {cwd[:300]!r}", PATH_REFUSED)
    return work if os.path.isdir(work) else home


class BaseLauncher(abc.ABC):
    """The decisions and the starting of one launcher; a :class:`~paitient.services.kit.channel.ChannelServer`
    puts :meth:`handlers` on its socket. Subclasses implement :meth:`caller`."""

    watch_required = True
    """The asking server must be a process the launcher sees (its pid and start time go to the keeper, which
    ends the kernel with it). The pod's launcher cannot see the server's container's processes."""

    def __init__(
        self,
        *,
        data_root: str | os.PathLike[str],
        run_dir: str | os.PathLike[str],
        limits: Limits,
        log: logging.Logger | None = None,
        bwrap: str = "/usr/bin/bwrap",
        prlimit: str = "/usr/bin/prlimit",
        python: str = sys.executable,
        seccomp: bool = True,
        tmp_bytes: int = TMP_BYTES,
        kernels_per_account: int = 8,
        cpu: CpuGroups | None = None,
    ):
        self.data_root = str(data_root)
        self.run_dir = str(run_dir)
        self.limits = limits
        self.log = log or logging.getLogger("paitient.services.launcher")
        self.bwrap = bwrap
        self.prlimit = prlimit
        self.python = python
        self.kernels = kernel_commands(python)
        self.seccomp = seccomp
        self.tmp_bytes = tmp_bytes
        self.kernels_per_account = kernels_per_account
        self.cpu = cpu
        """Where each account's kernels are scheduled as one (:mod:`.cpu`); None: per session."""
        self.handles: dict[str, tuple[subprocess.Popen, int]] = {}
        """Handle -> the kernel's keeper and the uid it was started for, while it runs."""
        self._lock = threading.Lock()
        self._starting: dict[int, threading.Lock] = {}
        """Per uid: held while one of its kernels is counted and started, or its cpu group removed."""
        self._names: dict[int, str] = {}
        """Per uid: its account's name (its cpu group's)."""
        self._servers: dict[int, set[int]] = {}
        """Per uid: the pids of the servers put in its cpu group (:meth:`_place_server`)."""

    def handlers(self) -> dict[str, Any]:
        return {"start": self.start, "alive": self.alive, "stop": self.stop}

    @property
    def children(self) -> dict[int, subprocess.Popen]:
        """The keepers of the kernels that run, by pid."""
        with self._lock:
            return {proc.pid: proc for proc, _ in self.handles.values()}

    # -- what the variants decide -------------------------------------------------------------------

    @abc.abstractmethod
    def caller(self, peer: Peer) -> Caller:
        """Who asks (from ``peer`` only), or :class:`ChannelError` (``forbidden``) for one not served."""

    def identity(self, caller: Caller) -> list[str]:
        """The prefix that runs the keeper, bubblewrap and the kernel as ``caller``: none where the launcher
        already is the caller's uid."""
        return []

    @contextlib.contextmanager
    def output(self, caller: Caller) -> Iterator[IO[bytes] | None]:
        """Where the kernel's output goes; None: the launcher's own."""
        yield None

    # -- the request and the sandbox ------------------------------------------------------------------

    def server(self, peer: Peer) -> tuple[int, int]:
        """(pid, start time) of the asking server for the keeper to watch; (0, 0): none it can see.

        The pid is the one the socket recorded at ``connect``: a caller that connected, handed the socket on and
        ended leaves a pid the kernel may give another process, another account's or root's, which the launcher
        would then put in the caller's cpu group and the keeper watch. So the process must be the caller's
        account's, before and after its start time is read."""
        start = process_start(peer.pid) if peer.pid > 0 else None
        if start is not None and process_uid(peer.pid) == peer.uid and process_start(peer.pid) == start:
            return peer.pid, start
        if peer.pid > 0 or self.watch_required:
            raise ChannelError("the asking process is gone", FORBIDDEN)
        return 0, 0

    def policy(self, caller: Caller, connection_file: str, kernel_dir: str, cwd: str) -> SandboxPolicy:
        runtime_dir = os.path.dirname(connection_file)
        return SandboxPolicy(
            home=caller.home,
            runtime_dir=runtime_dir,
            run_dir=self.run_dir,
            data=tuple(resolve_datasets(self.data_root, caller.projects)),
            system_ro=("/usr", *python_roots()),
            extra_ro=("/sys/devices/system/cpu",),
            env=kernel_env(caller.home, self.run_dir, runtime_dir),
            cwd=work_dir(cwd, caller.home),
            kernel_dir=kernel_dir,
            connection_file=connection_file,
            tmp_bytes=self.tmp_bytes,
        )

    def argv(
        self,
        caller: Caller,
        policy: SandboxPolicy,
        kernel: str,
        seccomp_fd: int | None,
        server: tuple[int, int] = (0, 0),
    ) -> list[str]:
        command = self.kernels.get(kernel)
        if command is None:
            raise ChannelError(f"no kernel {kernel[:80]!r}; known: {', '.join(sorted(self.kernels))}", UNKNOWN_KERNEL)
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
            *self.identity(caller),
            *keeper,
            *prlimit_argv(self.limits, self.prlimit),
            *build_bwrap_argv(policy, self.bwrap, seccomp_fd),
            *(policy.connection_file if part == "{connection_file}" else part for part in command),
        ]

    # -- the operation ----------------------------------------------------------------------------------

    def start(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        check_fields(args)
        if fds:
            raise ChannelError("the launcher takes no file descriptors", FIELD_REFUSED)
        caller = self.caller(peer)
        server = self.server(peer)
        runtime_dir = user_runtime_dir(caller.home)
        connection_file, kernel_dir = check_connection(args["connection_file"], caller.uid, runtime_dir)
        try:
            policy = self.policy(caller, connection_file, kernel_dir, args.get("cwd", ""))
        except PolicyError as e:
            raise ChannelError(str(e), BAD_REQUEST) from None
        with self._lock:
            starting = self._starting.setdefault(caller.uid, threading.Lock())
            self._names[caller.uid] = caller.name
        with starting:
            self.check_count(caller)
            self._place_server(server[0], caller)
            seccomp_fd = _seccomp_fd() if self.seccomp else None
            try:
                argv = self.argv(caller, policy, args["kernel"], seccomp_fd, server)
                with self.output(caller) as out:
                    proc = subprocess.Popen(
                        argv,
                        env={"PATH": "/usr/bin:/bin"},
                        cwd="/",
                        stdin=subprocess.PIPE,  # the keeper starts the sandbox once this closes
                        stdout=out,
                        stderr=out,
                        pass_fds=() if seccomp_fd is None else (seccomp_fd,),
                        start_new_session=True,
                    )
            finally:
                if seccomp_fd is not None:
                    os.close(seccomp_fd)
            self._place(proc, caller)
            handle = secrets.token_hex(16)
            with self._lock:
                self.handles[handle] = (proc, caller.uid)
        start = process_start(proc.pid)
        threading.Thread(target=self._reap, args=(proc, handle), name=f"kernel-{proc.pid}", daemon=True).start()
        datasets = [m.dest.removeprefix("/data/") for m in policy.data]
        self.log.info("launcher: kernel pid %d for %s with datasets %s", proc.pid, caller.name, datasets)
        return {"pid": proc.pid, "start": start, "datasets": datasets, "kernel": handle, "watched": server[0] > 0}

    def _place(self, proc: subprocess.Popen, caller: Caller) -> None:
        """Put the keeper in its account's cpu group, then let it start the sandbox. A keeper that cannot be
        placed is ended: its kernel would take a share of the CPU of its own."""
        assert proc.stdin is not None
        try:
            if self.cpu is not None:
                self.cpu.place(proc.pid, caller.name)
        except (OSError, ValueError) as e:
            proc.kill()  # before its stdin closes: the keeper has started nothing
            proc.wait()
            self.log.error("launcher: cannot put a kernel of %s in its cpu group: %s", caller.name, e)
            raise ChannelError(
                f"the kernel could not be put in its account's CPU group ({getattr(e, 'strerror', None) or e}); "
                "ask the workspace operator to look at the launcher's log",
                INTERNAL,
            ) from None
        finally:
            proc.stdin.close()

    def _place_server(self, pid: int, caller: Caller) -> None:
        """Put the asking server in its account's cpu group too: what a kernel makes its server do (each output
        it reads, checks and sends on) is then the account's CPU, not a share of its own beside every
        researcher's kernels together. Only a server in the launcher's own pid namespace (the local spawner's):
        one in a container is in the container's group, which its engine keeps."""
        if self.cpu is None or pid <= 0:
            return
        try:
            if os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid"):
                return
            if pid not in self.cpu.members(caller.name):
                self.cpu.place(pid, caller.name)
            with self._lock:
                self._servers.setdefault(caller.uid, set()).add(pid)
        except (OSError, ValueError) as e:
            self.log.warning("launcher: cannot put the server of %s (pid %d) in its cpu group: %s", caller.name, pid, e)

    def check_count(self, caller: Caller) -> None:
        """Refuse a kernel past ``kernels_per_account`` (``kernel_limit``): the keepers running as the caller's
        uid in ``/proc``, and this launcher's own kernels for it whose keeper has not yet become one (a
        process between ``choom``, ``setpriv`` and the keeper's start runs under another name)."""
        with self._lock:
            mine = {proc.pid for proc, uid in self.handles.values() if uid == caller.uid and proc.poll() is None}
        running = len(mine | keepers_of(caller.uid))
        if running >= self.kernels_per_account:
            raise ChannelError(
                f"{caller.name} already runs {running} kernel{'s' if running != 1 else ''}, the most one account "
                "may run at once "
                f"([sandbox] kernels_per_account = {self.kernels_per_account}); shut one down (in JupyterLab: "
                "the Running Terminals and Kernels tab, or Kernel > Shut Down Kernel in a notebook) and start "
                "this one again",
                KERNEL_LIMIT,
            )

    def _kernel(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> subprocess.Popen | None:
        """The running kernel (its keeper) that ``args`` names by its handle, if the caller asked for it."""
        if set(args) != {"kernel"} or not isinstance(args["kernel"], str) or not HANDLE.match(args["kernel"]):
            raise ChannelError("send only kernel: the handle that start answered", FIELD_REFUSED)
        if fds:
            raise ChannelError("the launcher takes no file descriptors", FIELD_REFUSED)
        caller = self.caller(peer)
        with self._lock:
            found = self.handles.get(args["kernel"])
        if found is None or found[1] != caller.uid:  # another uid's kernel is as unknown as one that never was
            return None
        return found[0]

    def alive(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """Whether the kernel still runs."""
        proc = self._kernel(peer, args, fds)
        return {"alive": proc is not None and proc.poll() is None}

    def stop(self, peer: Peer, args: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """End the kernel: its keeper kills it (SIGTERM to the keeper; bubblewrap's sandbox goes with it)."""
        proc = self._kernel(peer, args, fds)
        if proc is None or proc.poll() is not None:
            return {"stopped": False}
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        self.log.info("launcher: kernel pid %d stopped at its server's request", proc.pid)
        return {"stopped": True}

    def _reap(self, proc: subprocess.Popen, handle: str) -> None:
        code = proc.wait()
        with self._lock:
            found = self.handles.pop(handle, None)
            starting = None if found is None else self._starting.get(found[1])
        if self.cpu is not None and found is not None and starting is not None:
            self._release(self.cpu, found[1], starting)
        self.log.info("launcher: kernel pid %d ended (%s)", proc.pid, code)

    def _release(self, cpu: CpuGroups, uid: int, starting: threading.Lock, wait: float = 5.0) -> None:
        """Remove the account's cpu group once its last kernel has ended: the sandbox ends a moment after its
        keeper (bubblewrap's parent-death signal), so a group that still holds processes is given ``wait``
        seconds where no other kernel of the account is known to run. Not while the server that asked for a
        kernel is still in it: the group stays until the server has ended too (a later :meth:`CpuGroups.sweep`
        removes it)."""
        name = self._names.get(uid, "")
        if not name:
            return
        deadline = time.monotonic() + wait
        while True:
            with self._lock:
                others = any(u == uid and p.poll() is None for p, u in self.handles.values())
            with starting:  # not while a kernel of the account is being placed
                try:
                    if not others and self._server_holds(cpu, uid, name):
                        return
                    if others or cpu.release(name):
                        cpu.sweep()  # and the groups of accounts whose servers have ended since
                        return
                except OSError as e:
                    self.log.warning("launcher: cannot remove the cpu group of %s: %s", name, e)
                    return
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)

    def _server_holds(self, cpu: CpuGroups, uid: int, name: str) -> bool:
        """Whether a server placed in ``name``'s group is still in it (and so the group cannot go); forgets
        the servers that have left it. Called with the account's start lock held."""
        members = set(cpu.members(name))
        with self._lock:
            servers = self._servers.get(uid, set()) & members
            if servers:
                self._servers[uid] = servers
            else:
                self._servers.pop(uid, None)
        return bool(servers)

    def stop_all(self) -> None:
        """Kill every kernel this launcher started that still runs (tests; a pod's launcher on its way out)."""
        for proc in self.children.values():
            proc.kill()
            proc.wait(timeout=10)


def keepers_of(uid: int) -> set[int]:
    """The pids of the kernel keepers (:data:`KEEPER`, as :meth:`BaseLauncher.argv` starts them) running as
    ``uid``. A process of the account's own that only looks like one counts against that account alone.

    A keeper's child between its fork and its exec (the sandbox the keeper is starting) shows the keeper's
    command line, so one whose parent is a keeper is that keeper's, not a kernel of its own."""
    keeper = os.fsencode(KEEPER)
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])  # the name in parentheses may hold spaces
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        if len(argv) > 3 and argv[1:4] == [b"-I", b"-S", keeper]:
            parents[int(name)] = ppid
    return {pid for pid, ppid in parents.items() if ppid not in parents}


def _seccomp_fd() -> int:
    fd = os.memfd_create("paitient-seccomp", 0)
    os.write(fd, seccomp_program())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
