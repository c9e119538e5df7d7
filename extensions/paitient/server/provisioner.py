"""``paitient-sandbox``: the kernel provisioner that starts every kernel inside bubblewrap.

In a workspace the spawner sets ``launcher_socket``: the provisioner then writes the connection file and
asks the root-side launcher (:mod:`paitient.services.launcher`) for the kernel, naming only that file and
the kernel; the launcher decides the sandbox from the registry and the site configuration and starts it as
the user. The provisioner watches and signals the kernel by its pid (the user's own process) where the
launcher saw this server (a shared pid namespace); where it did not (a pod, whose server and launcher are
containers with pid namespaces of their own) it asks the launcher, by the handle the launcher gave the
kernel, whether the kernel runs and to end it (:class:`HandledKernel`). Without a
launcher (a server started by hand, the provisioner's own tests) it builds the same sandbox itself, as below.

Building it here, it runs inside the user's own server, as the user (bwrap needs no privilege: unprivileged user
namespaces). The policy (which projects and datasets, where the service sockets are, the limits) is
traitlets configuration that the spawner writes into a root-owned config dir (see
:mod:`paitient.hub.serverconfig`); nothing the user controls feeds into it. The command line is built by the
pure functions of :mod:`paitient.rules.sandbox`.

Resource limits are rlimits set by ``prlimit`` right before ``bwrap`` (cgroups v2 delegation is not
available to an unprivileged server on a hybrid cgroup host, so rlimits are what is enforced).

What a kernel gets: no network (only ``lo`` of its own namespace; ZMQ over ipc sockets), its own pid, ipc,
uts, cgroup and user namespaces with nested user namespaces disabled, no capabilities, no new privileges,
a new session, death with its parent; a read-only system, a minimal /etc, private /proc, /dev and /tmp,
the home read-write, each dataset of the user's projects read-only at /data/<project>/<dataset>, the
service sockets at their host path; an environment of eight variables; rlimits on private memory,
processes, open files and CPU time.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import pwd
import signal
import socket
import time
from pathlib import Path
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning import LocalProvisioner
from traitlets import Bool, Dict, List, Unicode, default

from paitient import channel
from paitient.config.sandboxtraits import sandbox_traits
from paitient.rules.sandbox import (
    Limits,
    PolicyError,
    SandboxPolicy,
    build_bwrap_argv,
    kernel_env,
    prlimit_argv,
    python_roots,
    resolve_datasets,
)
from paitient.rules.seccomp import seccomp_program
from paitient.server import audit as client

MAX_UNIX_PATH = 107


def ipc_prefix(connection_file: str, kernel_id: str) -> str:
    """Path prefix of a kernel's ipc sockets, in a folder of its own next to its connection file
    (``<runtime>/k<id[:8]>/k-<n>``); refuses paths too long to bind."""
    folder = os.path.join(os.path.dirname(os.path.abspath(connection_file)), "k" + kernel_id.replace("-", "")[:8])
    prefix = os.path.join(folder, "k")
    if len(os.fsencode(prefix)) + 4 > MAX_UNIX_PATH:
        raise PolicyError(
            f"the runtime dir {os.path.dirname(connection_file)} is too long for unix socket paths "
            f"({MAX_UNIX_PATH} bytes at most); give the server a shorter JUPYTER_RUNTIME_DIR"
        )
    return prefix


class SandboxProvisioner(LocalProvisioner):
    """Start the kernel in a bubblewrap sandbox: no network, read-only data, no credentials, limits."""

    data_root = Unicode("", help="Root of the published datasets (site data_root).").tag(config=True)
    run_dir = Unicode("", help="Folder of the services' unix sockets (site run_dir); bound read-only.").tag(config=True)
    projects = Dict(
        {},
        help="Project name -> dataset names this user may read. Written by the spawner from the registry.",
    ).tag(config=True)
    memory_mb, max_processes, max_open_files, cpu_seconds, tmp_bytes, bwrap_path, prlimit_path = sandbox_traits()
    system_ro = List(Unicode(), help="Host folders bound read-only at the same path.").tag(config=True)
    extra_ro = List(
        Unicode(),
        ["/sys/devices/system/cpu"],
        help="Optional read-only paths (skipped where missing); CPU topology lets numeric libraries size threads.",
    ).tag(config=True)

    seccomp = Bool(
        True, help="Load the seccomp filter (ptrace, process memory, keyrings, eBPF, mount calls refused)."
    ).tag(config=True)
    launcher_socket = Unicode(
        "",
        help="The root-side launcher's socket (<state_dir>/gate/launcher.sock). Set (as the spawner does): the "
        "launcher builds the sandbox from the registry and the site configuration and starts the kernel as "
        "this user; this server only names the connection file and the kernel. Empty: the sandbox is built "
        "here, from this configuration.",
    ).tag(config=True)

    _mounted: list[str] = []

    @default("system_ro")
    def _system_ro_default(self) -> list[str]:
        return ["/usr", *python_roots()]

    # ------------------------------------------------------------------ policy

    def limits(self) -> Limits:
        return Limits(self.memory_mb, self.max_processes, self.max_open_files, self.cpu_seconds)

    def policy(self, connection_file: str, cwd: str | None, kernel_dir: str = "") -> SandboxPolicy:
        if not self.run_dir or not self.data_root:
            raise PolicyError(
                "SandboxProvisioner.run_dir and .data_root are not configured; the spawner writes them "
                "with paitient.hub.serverconfig.write_user_server_config"
            )
        home = pwd.getpwuid(os.getuid()).pw_dir
        connection_file = str(Path(connection_file).resolve())
        runtime_dir = os.path.dirname(connection_file)
        home_prefix = home.rstrip("/") + "/"
        work = str(Path(cwd).resolve()) if cwd else home
        if work != home and not work.startswith(home_prefix):
            work = home
        return SandboxPolicy(
            home=home,
            runtime_dir=runtime_dir,
            run_dir=self.run_dir,
            data=tuple(resolve_datasets(self.data_root, {p: list(d) for p, d in self.projects.items()})),
            system_ro=tuple(self.system_ro),
            extra_ro=tuple(self.extra_ro),
            env=kernel_env(home, self.run_dir, runtime_dir),
            cwd=work,
            kernel_dir=kernel_dir,
            connection_file=connection_file if kernel_dir else "",
            tmp_bytes=self.tmp_bytes,
        )

    # ------------------------------------------------------------------ provisioner hooks

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        if os.geteuid() == 0:
            raise PolicyError(
                "refusing to start a sandboxed kernel as root: bwrap's user namespace would keep root's "
                "file access. Start the user's server as the user's own account."
            )
        km = self.parent
        if km is not None:
            # The kernel has no network: ZMQ must run over unix sockets next to the connection file.
            # Socket paths are short (a unix socket path has at most 107 bytes): <runtime>/k<id[:8]>/k-<n>.
            km.transport = "ipc"
            km.ip = ipc_prefix(km.connection_file, str(self.kernel_id or km.kernel_id or "kernel"))
            os.makedirs(os.path.dirname(km.ip), mode=0o700, exist_ok=True)
        if self.kernel_spec is not None:
            # A signal would hit bwrap, not the kernel, and end the sandbox.
            self.kernel_spec.interrupt_mode = "message"
        return await super().pre_launch(**kwargs)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        km = self.parent
        if km is None:
            raise PolicyError("a sandboxed kernel needs its kernel manager (the provisioner has no parent)")
        if self.launcher_socket:
            return await self._launch_by_root(km, kwargs.get("cwd"))
        kernel_dir = os.path.dirname(km.ip) if km.transport == "ipc" else ""
        # Resolving the dataset versions touches the filesystem: off the event loop.
        policy = await asyncio.to_thread(self.policy, km.connection_file, kwargs.get("cwd"), kernel_dir)
        seccomp_fd = _seccomp_fd() if self.seccomp else None
        argv = [
            *prlimit_argv(self.limits(), self.prlimit_path),
            *build_bwrap_argv(policy, self.bwrap_path, seccomp_fd),
            *cmd,
        ]
        if seccomp_fd is not None:
            kwargs["pass_fds"] = (seccomp_fd,)
        # bwrap itself runs outside the sandbox: give it nothing from the server's environment
        # (an LD_PRELOAD there would run the user's code unsandboxed).
        kwargs["env"] = {"PATH": "/usr/bin:/bin"}
        kwargs["cwd"] = policy.home
        self.log.info("Starting sandboxed kernel %s with datasets %s", self.kernel_id, _datasets(policy))
        try:
            info = await super().launch_kernel(argv, **kwargs)
        finally:
            if seccomp_fd is not None:
                os.close(seccomp_fd)
        self._mounted = _datasets(policy)
        await self._audit(
            "kernel.start",
            {"datasets": self._mounted, "limits": vars(self.limits()), "pid": self.pid},
        )
        return info

    async def _launch_by_root(self, km: Any, cwd: str | None) -> KernelConnectionInfo:
        """Ask the launcher for this kernel: it reads the connection file, decides the sandbox, starts it."""
        args = {"connection_file": str(Path(km.connection_file).absolute()), "kernel": km.kernel_name or "python3"}
        if cwd:
            args["cwd"] = str(cwd)
        try:
            answer = await asyncio.to_thread(channel.call, self.launcher_socket, "start", args, timeout=60.0)
        except channel.ChannelError as e:
            raise PolicyError(f"the sandbox launcher refused or failed to start the kernel: {e}") from None
        if answer.get("watched", True) is False:  # the launcher did not see this server: its pids are not ours
            handled = HandledKernel(self.launcher_socket, str(answer["kernel"]))
            self.process = handled  # type: ignore[assignment]  # what LocalProvisioner calls of a Popen
            self.pid = self.pgid = None  # LocalProvisioner then signals through the process object
        else:
            kernel = LaunchedKernel(int(answer["pid"]), answer.get("start"))
            self.process = kernel  # type: ignore[assignment]  # what LocalProvisioner calls of a Popen, nothing more
            self.pid = kernel.pid
            self.pgid = kernel.pid  # the launcher starts it in a session (and process group) of its own
        self._mounted = list(answer.get("datasets", []))
        self.log.info(
            "The launcher started sandboxed kernel %s (pid %s) with datasets %s",
            self.kernel_id,
            self.pid or f"{answer.get('pid')}, in the launcher's pid namespace",
            self._mounted,
        )
        await self._audit(
            "kernel.start",
            {"datasets": self._mounted, "limits": vars(self.limits()), "pid": answer.get("pid"), "launcher": True},
        )
        return self.connection_info

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart=restart)
        km = self.parent
        if not restart and km is not None and km.transport == "ipc":
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(km.ip))  # the sockets are gone by now; only an empty folder is removed
        if not restart:
            await self._audit("kernel.stop", {"datasets": self._mounted})

    async def _audit(self, action: str, details: dict[str, Any]) -> None:
        if not self.run_dir:
            return
        try:
            await asyncio.to_thread(
                client.send, self.run_dir, action=action, object=str(self.kernel_id), details=details
            )
        except Exception as e:
            self.log.error("could not record %s for kernel %s in the audit trail: %s", action, self.kernel_id, e)


class _NotOurChild(abc.ABC):
    """The part of ``Popen`` the provisioner uses (LocalProvisioner calls nothing more), for a kernel that is
    not this server's child: subclasses say whether it still runs (:meth:`poll`) and how to signal it."""

    stdin = stdout = stderr = None
    pid: int | None = None
    POLL_SECONDS = 0.05

    def __init__(self) -> None:
        self.returncode: int | None = None

    @abc.abstractmethod
    def poll(self) -> int | None:
        """None while the kernel runs; then its exit code (0 where that is not ours to see)."""

    @abc.abstractmethod
    def send_signal(self, signum: int) -> None:
        """Signal the kernel (as far as this stand-in can)."""

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the kernel (pid {self.pid}) still runs" if self.pid else "the kernel still runs")
            time.sleep(self.POLL_SECONDS)
        return self.returncode or 0

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class LaunchedKernel(_NotOurChild):
    """A kernel the launcher started (the user's own process, not this server's child): its pid and start time
    name it; signals go to it directly."""

    def __init__(self, pid: int, start: int | None):
        super().__init__()
        self.pid = pid
        self.start = start

    def poll(self) -> int | None:
        if self.returncode is None and not _alive(self.pid or 0, self.start):
            self.returncode = 0  # not our child: its exit status is the launcher's to see
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None and self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


class HandledKernel(_NotOurChild):
    """A kernel whose process this server cannot see (a pod's launcher, in a container with a pid namespace of
    its own): the launcher answers whether it runs and ends it, by the handle it gave the kernel. A launcher
    that is gone took its kernels with it (they are its container's processes), so a launcher that cannot be
    reached counts the kernel ended; one that is slow to answer leaves it running. Only SIGTERM and SIGKILL
    mean anything here: both end the kernel (interrupts are messages, ``interrupt_mode`` is ``message``)."""

    ASK_SECONDS = 5.0
    POLL_SECONDS = 0.1  # each poll is a question to the launcher

    def __init__(self, socket: str, handle: str):
        super().__init__()
        self.socket = socket
        self.handle = handle

    def _ask(self, op: str) -> dict[str, Any] | None:
        try:
            return channel.call(self.socket, op, {"kernel": self.handle}, timeout=self.ASK_SECONDS)
        except channel.ChannelError as e:
            if e.code == channel.UNAVAILABLE and not self._listening():  # the launcher and its kernels are gone
                self.returncode = -signal.SIGKILL
            return None

    def _listening(self) -> bool:
        """Whether anything listens on the launcher's socket (busy counts: only a refusal or no socket do not)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(self.socket)
            except (FileNotFoundError, ConnectionRefusedError):
                return False
            except OSError:
                return True
        return True

    def poll(self) -> int | None:
        if self.returncode is None:
            answer = self._ask("alive")
            if answer is not None and not answer.get("alive"):
                self.returncode = 0  # its exit status is the launcher's to see
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGKILL) and self.poll() is None:
            self._ask("stop")


def _alive(pid: int, start: int | None) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0] not in ("Z", "X") and (start is None or int(fields[19]) == start)


def _seccomp_fd() -> int:
    """An anonymous file holding the filter, read by bwrap from the inherited descriptor."""
    fd = os.memfd_create("paitient-seccomp", 0)
    os.write(fd, seccomp_program())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _datasets(policy: SandboxPolicy) -> list[str]:
    return [m.dest.removeprefix("/data/") for m in policy.data]
