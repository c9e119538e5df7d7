"""The docker spawner: each researcher's server in a container of its own, on podman's Docker API.

``PaitientDockerSpawner`` extends DockerSpawner with what the local spawner does (the account, the examples,
the root-owned server configuration, the audit records: :class:`~paitient.hub.spawner.WorkspaceServerMixin`)
and decides everything about the container itself; DockerSpawner's settings that would let configuration
change it (``volumes``, ``mounts``, ``extra_host_config``, ``extra_create_kwargs``, ``links``,
``allowed_images``) are refused at start.

The container (:func:`container_spec`, pure):

- runs the server as the researcher's uid and primary group, with the workspace's group as its one
  supplementary group (the services' sockets), no capability (``cap_drop ALL``), ``no-new-privileges``, the
  engine's seccomp filter, a read-only root;
- holds no data: its image is a few empty folders (:func:`paitient.hub.engine.base_layer`); bound into it
  at the same paths are the host's ``/usr`` and the workspace's Python (read-only), ``/etc/passwd`` and
  ``/etc/group`` written for this account alone (read-only), the home (read-write), the folders of the
  services' sockets (read-only: sockets stay connectable), and the server's root-owned configuration
  (read-only) with its own state folder beside it. No dataset: kernels get their data from the host's
  launcher, which starts them in bubblewrap on the host as it does for a local server;
- shares the host's pid namespace, so the launcher (``SO_PEERCRED``) and the kernel's keeper see the server
  by its host pid, and the server watches and signals its kernels by theirs;
- joins a network namespace that :mod:`paitient.hub.servernet` holds (``--hold``): only ``lo``, the hub's
  API forwarded in, the server's port forwarded out to the host's loopback, where the proxy and the hub
  reach it. The same namespace, made by the same code, as a local server's: nothing else is reachable.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dockerspawner import DockerSpawner
from jupyterhub.utils import random_port
from traitlets import Int, default

from paitient.config import SiteConfig
from paitient.fsutil import atomic_write_text
from paitient.hub.engine import Engine, image_tag
from paitient.hub.paths import HubPaths, server_argv, venv_python
from paitient.hub.spawner import SERVERNET, WorkspaceServerMixin
from paitient.registry import Member
from paitient.rules.sandbox import python_roots
from paitient.services import egress, launcher
from paitient.services.kit.access import workspace_group
from paitient.services.kit.process import process_start

LOCKED_SETTINGS = ("volumes", "read_only_volumes", "mounts", "extra_host_config", "extra_create_kwargs", "links")
"""DockerSpawner settings that would change what the container mounts, runs as or reaches: refused."""

HOLD_SECONDS = 10.0
"""How long the namespace holder may take to listen."""


@dataclass(frozen=True)
class Bind:
    source: str
    writable: bool = False
    dest: str = ""
    """Where it appears in the container; empty: at its own path."""

    @property
    def target(self) -> str:
        return self.dest or self.source


@dataclass(frozen=True)
class ContainerPlan:
    """Everything the container is made from; :func:`container_spec` turns it into the engine's request."""

    name: str
    image: str
    command: list[str]
    env: dict[str, str]
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    binds: tuple[Bind, ...]
    netns: str
    """``/proc/<holder pid>/ns/net``."""
    log_path: str
    labels: dict[str, str]
    mem_limit: int | None = None
    cpu_quota: int | None = None


def container_binds(site: SiteConfig, home: str, user_dir: Path, python: tuple[str, ...]) -> tuple[Bind, ...]:
    """What a server's container sees of the host, each at its own path; nothing else is there."""
    binds = [
        Bind("/usr"),
        *(Bind(root) for root in python),
        Bind(str(user_dir / "etc" / "passwd"), dest="/etc/passwd"),
        Bind(str(user_dir / "etc" / "group"), dest="/etc/group"),
        Bind(home, writable=True),
        Bind(str(egress.socket_path(site).parent)),  # egress and launcher sockets (<state_dir>/gate)
        Bind(str(site.run_dir)),  # the services' sockets
        Bind(str(user_dir / "config")),
        Bind(str(user_dir / "data")),
        Bind(str(user_dir / "state"), writable=True),
    ]
    if launcher.socket_path(site).parent != egress.socket_path(site).parent:
        binds.append(Bind(str(launcher.socket_path(site).parent)))
    if os.path.exists("/etc/localtime"):
        binds.append(Bind("/etc/localtime"))
    return tuple(binds)


def container_spec(plan: ContainerPlan) -> tuple[dict[str, Any], dict[str, Any]]:
    """(create_container keyword arguments without ``host_config``, ``create_host_config`` keyword
    arguments) for ``plan``."""
    host_config: dict[str, Any] = {
        "binds": {
            b.source: {"bind": b.target, "mode": "rw" if b.writable else "ro"}
            for b in sorted(plan.binds, key=lambda b: b.source)
        },
        "network_mode": f"ns:{plan.netns}",
        "pid_mode": "host",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "read_only": True,
        "group_add": [str(g) for g in plan.groups],
        "log_config": {"type": "k8s-file", "config": {"path": plan.log_path}},
    }
    if plan.mem_limit is not None:
        host_config["mem_limit"] = plan.mem_limit
    if plan.cpu_quota is not None:
        host_config["cpu_period"], host_config["cpu_quota"] = 100_000, plan.cpu_quota
    create = {
        "image": plan.image,
        "name": plan.name,
        "command": plan.command,
        "environment": plan.env,
        "user": f"{plan.uid}:{plan.gid}",
        "working_dir": plan.home,
        "labels": plan.labels,
    }
    return create, host_config


def account_files(account: str, uid: int, gid: int, home: str, workspace_gid: int) -> tuple[str, str]:
    """The container's /etc/passwd and /etc/group: root, the account, its group and the workspace's group.
    No other account of the host is named, and no project group: the server holds none."""
    try:
        group_name = grp.getgrgid(gid).gr_name
    except KeyError:
        group_name = account
    try:
        workspace_name = grp.getgrgid(workspace_gid).gr_name
    except KeyError:
        workspace_name = "paitient-users"
    passwd = f"root:x:0:0:root:/root:/usr/sbin/nologin\n{account}:x:{uid}:{gid}::{home}:/usr/sbin/nologin\n"
    group = f"root:x:0:\n{group_name}:x:{gid}:\n{workspace_name}:x:{workspace_gid}:{account}\n"
    return passwd, group


class PaitientDockerSpawner(WorkspaceServerMixin, DockerSpawner):
    """A researcher's server in a container on the workspace's engine (:mod:`paitient.hub.engine`)."""

    holder_pid = Int(0, help="The namespace holder's pid (set at start; kept across hub restarts).")
    holder_start = Int(0, help="The holder's start time in clock ticks: with the pid, names one process.")

    @default("image")
    def _image_default(self) -> str:
        return image_tag()

    @default("client_kwargs")
    def _client_kwargs_default(self) -> dict:
        return {"base_url": Engine(self.site.state_dir).url}

    @default("cmd")
    def _cmd_default(self) -> list[str]:
        return server_argv()

    @default("pull_policy")
    def _pull_policy_default(self) -> str:
        return "never"  # no registry: `paitient up` makes the image

    @default("remove")
    def _remove_default(self) -> bool:
        return True  # nothing lives in the container: the home and the state folder are on the host

    @default("prefix")
    def _prefix_default(self) -> str:
        return "paitient"

    @default("ip")
    def _ip_default(self) -> str:
        return "127.0.0.1"

    @default("port")
    def _port_default(self) -> int:
        return 0  # a free host port at each start

    @default("use_internal_ip")
    def _use_internal_ip_default(self) -> bool:
        return True  # no published ports: the holder forwards the server's port

    @default("env_keep")
    def _env_keep_default(self) -> list[str]:
        return ["LANG", "LC_ALL"]

    # -- state across hub restarts -------------------------------------------------------------

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.holder_pid = state.get("holder_pid", 0)
        self.holder_start = state.get("holder_start", 0)

    def get_state(self) -> dict:
        state = super().get_state()
        if self.holder_pid:
            state["holder_pid"], state["holder_start"] = self.holder_pid, self.holder_start
        return state

    def clear_state(self) -> None:
        super().clear_state()
        self.holder_pid = self.holder_start = 0
        self.port = 0  # a free one again at the next start

    # -- the container ---------------------------------------------------------------------------

    def check_settings(self) -> None:
        set_ = [name for name in LOCKED_SETTINGS if getattr(self, name)]
        if self._get_allowed_images():
            set_.append("allowed_images")
        if set_:
            raise RuntimeError(
                f"PaitientDockerSpawner decides the container's mounts, user and network itself; unset "
                f"{', '.join(set_)} (the workspace refuses them: a setting there could mount data or widen access)"
            )

    def get_env(self) -> dict[str, str]:
        return self.server_env(super().get_env())

    def _write_account_files(self, member: Member) -> Path:
        pw = pwd.getpwnam(member.account)
        user_dir = HubPaths.of(self.site).user_dir(member.account)
        etc = user_dir / "etc"
        etc.mkdir(exist_ok=True)
        os.chown(etc, 0, 0)
        os.chmod(etc, 0o755)
        passwd, group = account_files(member.account, pw.pw_uid, pw.pw_gid, pw.pw_dir, workspace_group(self.site))
        atomic_write_text(etc / "passwd", passwd, mode=0o644)
        atomic_write_text(etc / "group", group, mode=0o644)
        return user_dir

    async def plan(self, member: Member, netns: str) -> ContainerPlan:
        pw = pwd.getpwnam(member.account)
        user_dir = await asyncio.to_thread(self._write_account_files, member)
        log_path = HubPaths.of(self.site).log_dir / f"server-{member.account}.log"
        return ContainerPlan(
            name=self.object_name,
            image=self.image,
            command=await self.get_command(),
            env=self.get_env(),
            uid=pw.pw_uid,
            gid=pw.pw_gid,
            groups=(workspace_group(self.site),),
            home=pw.pw_dir,
            binds=container_binds(self.site, pw.pw_dir, user_dir, tuple(python_roots())),
            netns=netns,
            log_path=str(log_path),
            labels={
                "org.paitient.account": member.account,
                "org.paitient.user": self.user.name,
                "org.paitient.state-dir": str(self.site.state_dir),
            },
            mem_limit=self.mem_limit,
            cpu_quota=None if self.cpu_limit is None else int(self.cpu_limit * 100_000),
        )

    async def create_object(self) -> dict:
        assert self._plan is not None, "create_object() is called from start() only"
        create, host = container_spec(self._plan)
        create["host_config"] = self.client.create_host_config(**host)
        return await self.docker("create_container", **create)

    async def get_ip_and_port(self) -> tuple[str, int]:
        return self.ip, self.port  # the holder's host side

    # -- the namespace holder ----------------------------------------------------------------------

    def _hold(self, log_path: Path) -> tuple[int, int]:
        """Start :mod:`~paitient.hub.servernet` ``--hold`` for this server; (pid, start) once it listens."""
        api = urlsplit(self.hub.api_url)
        if api.hostname != "127.0.0.1" or api.port is None:
            raise ValueError(f"the hub's API must listen on 127.0.0.1 with an explicit port, not {self.hub.api_url!r}")
        with open(log_path, "ab", buffering=0) as log:
            proc = subprocess.Popen(
                [
                    venv_python(),
                    "-I",
                    "-S",  # standard library only
                    str(SERVERNET),
                    "--hold",
                    f"--listen=127.0.0.1:{self.port}",
                    f"--hub-api=127.0.0.1:{api.port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,  # it outlives a hub restart, as the server does
            )
        assert proc.stdout is not None
        line = proc.stdout.readline().decode(errors="replace")
        proc.stdout.close()
        start = process_start(proc.pid)
        if not line.startswith("servernet: holding ") or start is None:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"the server's network namespace could not be made; see {log_path}")
        self._holder = proc
        return proc.pid, start

    def holder_alive(self) -> bool:
        return bool(self.holder_pid) and process_start(self.holder_pid) == self.holder_start

    def release_holder(self) -> None:
        """End the holder (SIGTERM, SIGKILL after 5 s), whether this hub or an earlier one started it, and
        forget it."""
        pid, start, proc = self.holder_pid, self.holder_start, self._holder
        self.holder_pid = self.holder_start = 0
        self._holder = None

        def alive() -> bool:
            if proc is not None:
                proc.poll()  # reap our own child, so that its end shows
            return bool(pid) and process_start(pid) == start

        if alive():
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if alive():
                os.kill(pid, signal.SIGKILL)
        if proc is not None:
            proc.wait()

    # -- start, poll, stop -------------------------------------------------------------------------

    _plan: ContainerPlan | None = None
    _holder: subprocess.Popen | None = None

    async def start(self):
        self.check_settings()
        member = await self.prepare_member()
        if not self.port:
            self.port = random_port()
        log_path = HubPaths.of(self.site).log_dir / f"server-{member.account}.log"
        try:
            self.holder_pid, self.holder_start = await asyncio.wait_for(
                asyncio.to_thread(self._hold, log_path), HOLD_SECONDS
            )
            self._plan = await self.plan(member, f"/proc/{self.holder_pid}/ns/net")
            ip_port = await super().start()
        except BaseException as e:
            await asyncio.to_thread(self.release_holder)
            if self.container_id:  # made, but not started: nothing is left for the next start to find
                try:
                    await self.remove_object()
                except Exception as removal:
                    self.log.warning(
                        "container %s of %s not removed: %s", self.container_id[:12], self.user.name, removal
                    )
                self.object_id = ""
            await self._audit("server.spawn", "error", reason=f"{type(e).__name__}: {e}"[:500])
            raise
        finally:
            self._plan = None
        await self._audit(
            "server.spawn",
            uid=pwd.getpwnam(member.account).pw_uid,
            container=self.container_id[:12],
            holder=self.holder_pid,
            projects=list(member.projects),
            roles=list(member.roles),
        )
        return ip_port

    async def poll(self):
        status = await super().poll()
        if status is None and not self.holder_alive():
            status = "the server's network namespace holder is gone"
        if status is not None and self.holder_pid:
            # A server that ended by itself (idle, crashed) is not stopped through stop(): the hub only clears
            # the state of a server that poll() says is gone. Its holder ends here, its container goes.
            await asyncio.to_thread(self.release_holder)
            if self.container_id:
                await self.stop_object()  # running still when only its holder is gone
                if self.remove:
                    await self.remove_object()
        return status

    async def stop(self, now: bool = False) -> None:
        container, holder, start = self.container_id[:12], self.holder_pid, self.holder_start
        try:
            if self.container_id:
                await super().stop(now=now)
        finally:
            # DockerSpawner's stop() clears the state, the holder's pid included: end it from what was kept
            self.holder_pid, self.holder_start = holder, start
            await asyncio.to_thread(self.release_holder)
        await self._audit("server.stop", container=container, holder=holder, now=now)
