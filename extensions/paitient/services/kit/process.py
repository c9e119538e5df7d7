"""Processes and sockets of the root-side services: dying with the hub, stop signals, ports, the hub's
service entries."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import time
from collections.abc import Iterable
from pathlib import Path

from paitient.config.workspace import service_origin


def parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` to this process when the thread that started it ends, however it
    ends (``PR_SET_PDEATHSIG``). Safe as a ``preexec_fn``: children of ``paitient up`` use it that way."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)


def die_with_parent() -> None:
    """End this service when the process that started it (the hub) ends, however it ends.

    A hub that is killed cannot stop its managed services; without this they would outlive it and hold
    their sockets. A service started by hand from a shell ends with that shell. The signal is SIGKILL: a
    service busy with a request (an airlock audit, say) must not outlive its hub by minutes, and every
    service keeps its state crash-safe anyway (committed transactions, fsync'd audit records).
    """
    parent = os.getppid()
    parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:  # the parent ended before the request took effect
        raise SystemExit("paitient service: the process that started this service has ended")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (loopback by default)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1", avoid: Iterable[int | None] = ()) -> list[int]:
    """``count`` distinct TCP ports free on ``host`` right now, none of ``avoid`` (ports configured for
    something else). Each is held open until all are chosen: asked one at a time, the system may hand out a
    port it just gave back, and two servers were then told to listen on the same one."""
    configured = {p for p in avoid if p}
    held: list[socket.socket] = []
    chosen: list[int] = []
    try:
        while len(chosen) < count:
            s = socket.socket()
            held.append(s)  # a port of ``avoid`` stays held too, so it is not offered again
            s.bind((host, 0))
            port = s.getsockname()[1]
            if port not in configured and port not in chosen:
                chosen.append(port)
        return chosen
    finally:
        for s in held:
            s.close()


def managed_service(site, name: str, python: str, *, port: int, scopes: list[str], description: str) -> dict:
    """The ``c.JupyterHub.services`` entry that runs ``paitient service NAME`` as a hub-managed service.

    Its web pages listen on loopback at ``port`` (0: a free port now) behind ``/services/NAME/``, signed in
    through the hub's OAuth with ``scopes`` as the scopes its tokens may carry.
    """
    command = [python, "-m", "paitient.cli", "service", name, f"--state-dir={site.state_dir}"]
    if site.source:
        command.append(f"--site={site.source}")
    return {
        "name": name,
        "command": command,
        "url": f"http://127.0.0.1:{port or free_port()}",
        "oauth_no_confirm": True,
        "oauth_client_allowed_scopes": sorted(scopes),
        "display": True,
        "info": {"description": description},
    }


class StopSignal:
    """Notes SIGTERM and SIGINT for a service's main loop.

    The handler only sets a flag: a handler that calls ``threading.Event.set()`` can interrupt the main
    thread inside ``Event.wait()`` while it holds the event's lock, and then waits for that lock forever.
    """

    def __init__(self, tick: float = 0.05):
        """``tick``: how often the flag is looked at, the most a stop waits for it (a sleeping main thread
        wakes for the signal's handler, then sleeps out the rest of its tick)."""
        self.received = False
        self.tick = tick
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until a stop signal came (True) or ``timeout`` seconds passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.received:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(self.tick)
        return True


def socket_path(site, name: str):
    """Where service ``name`` listens (host path; the same path inside every sandbox)."""
    return site.run_dir / f"{name}.sock"


SEPARATE_PORTS = {"ledger": 8102, "audit": 8103, "airlock": 8104, "egress": 8105, "jobs": 8106}
"""Loopback ports of the services' pages (and metrics) when each runs as a systemd unit of its own
(``paitient install``); ``paitient up --separate-services`` picks free ones for the same services."""


def token_secret(name: str) -> str:
    """The name of the hub secret (``<state_dir>/hub/<name>``) that a separately run service ``name`` and the
    hub share as the service's API token."""
    return f"service_{name}_token"


def separate_service(entry: dict, token: str) -> dict | None:
    """The hub's entry for a service that runs on its own (a systemd unit, or ``up --separate-services``),
    from its managed entry: no command (the hub does not start it), its API token given. None for a service
    without pages: the hub has nothing to route or sign in to, so it is not registered."""
    if "url" not in entry:
        return None
    out = {key: value for key, value in entry.items() if key != "command"}
    out["api_token"] = token
    return out


def separate_service_env(
    entry: dict, token: str, hub_port: int, hub_api_url: str = "", subdomain_host: str = ""
) -> dict[str, str]:
    """The environment the hub gives a managed service (its pages' sign-in through the hub's OAuth), for a
    service run on its own: the same variables JupyterHub's service spawner sets, from the same entry. The
    hub's API is ``hub_api_url`` where given (a hub in another pod), else on loopback at ``hub_port``. With
    ``subdomain_host`` (``[workspace]``) the hub is there and the service on an origin of its own, where the
    hub sends the browser back after sign-in."""
    name = entry["name"]
    prefix = f"/services/{name}/"
    access = ["access:services", f"access:services!service={name}"]
    return {
        "JUPYTERHUB_SERVICE_NAME": name,
        "JUPYTERHUB_SERVICE_URL": entry["url"],
        "JUPYTERHUB_SERVICE_PREFIX": prefix,
        "JUPYTERHUB_API_TOKEN": token,
        "JPY_API_TOKEN": token,
        "JUPYTERHUB_API_URL": hub_api_url or f"http://127.0.0.1:{hub_port}/hub/api",
        "JUPYTERHUB_BASE_URL": "/",
        "JUPYTERHUB_HOST": subdomain_host,
        "JUPYTERHUB_CLIENT_ID": f"service-{name}",
        "JUPYTERHUB_OAUTH_CALLBACK_URL": f"{service_origin(subdomain_host, name)}{prefix}oauth_callback",
        "JUPYTERHUB_OAUTH_SCOPES": json.dumps(access),
        "JUPYTERHUB_OAUTH_ACCESS_SCOPES": json.dumps(access),
        "JUPYTERHUB_OAUTH_CLIENT_ALLOWED_SCOPES": json.dumps(entry.get("oauth_client_allowed_scopes", [])),
    }


def process_uid(pid: int) -> int | None:
    """The real uid of process ``pid``; None if there is none."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    return None


def process_start(pid: int) -> int | None:
    """The start time (clock ticks after boot) of a live, non-zombie process; None if there is none. With the
    pid it names one process: a pid the kernel gives again later has another start time."""
    if pid <= 0:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])
