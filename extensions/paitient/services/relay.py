"""The relay of a user's Kubernetes pod: the services' sockets in the pod, carried to the services' gateway.

Process: ``python -I -m paitient.services.relay``, in the pod's ``kernels`` container, as the pod's uid
(never root), outside every sandbox. Trusted for: who in the pod calls (a kernel or the server) and the
pod's token, which it holds and no kernel can read (a file the kernels container mounts and no sandbox
binds: the relay refuses to start with it anywhere a sandbox binds).

It serves ``<run dir>/<service>.sock`` for the services a pod calls (:data:`~paitient.services.gateway.
SERVICES`), the sockets every kernel's sandbox binds, with the services' own wire format
(:mod:`paitient.channel`). For each connection it

1. learns the peer by ``SO_PEERCRED``: any uid but its own is refused (``forbidden``) before its request is
   read; a pid it sees (in its own pid namespace) is a kernel, pid 0 (another pid namespace: the server's
   container) is the server; the caller's start time comes from ``/proc``;
2. reads the request and each descriptor passed with it: a regular file only, at most the service's limit
   (``too_large`` before a byte of it is sent);
3. sends the gateway (TLS 1.3, trusting ``--gateway-ca`` alone; plain TCP only with ``--plain-tcp``) one
   header line with the pod's token, the service, the request's ``op`` and
   ``args`` and its own view of the caller (origin, pid, start), then each file's bytes; whatever else the
   caller's request line says (an origin, a pid, an ``on_behalf``) is dropped;
4. sends the gateway's answer line back to the caller.

Every ``report_seconds`` it also sends the gateway the pod's live processes (pid and start time of each it
sees), which keeps reservations the pod's kernels made alive in the ledger.

It also serves the egress gate's socket (``/run/paitient/egress.sock``, beside the launcher's: a folder the
server's container mounts and no sandbox binds) for the pod's server alone: a caller it sees (a kernel) is
refused, as is any other uid. Each connection is one stream to the gateway (``{"token", "stream":
"egress"}``), carried both ways unread once the gateway accepted it; the egress service reads the frames
(:mod:`paitient.rules.egress`). A refused connection is answered with one frame in the gate's own format, so
the server reads the reason and withholds what it could not check.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import ssl
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

from traitlets import Bool, Float, Int, Unicode, default
from traitlets.config import Application

from paitient import __version__
from paitient.channel import (
    FORBIDDEN,
    MAX_ANSWER,
    TOO_LARGE,
    UNAVAILABLE,
    ChannelError,
    Peer,
    read_line,
    recv_exactly,
)
from paitient.rules.egress import FrameError, encode_frame, read_header
from paitient.services.gateway import PORT, SERVICES, limits_with
from paitient.services.kit.channel import UnixSocketServer, peer_of, read_request
from paitient.services.kit.pipe import splice
from paitient.services.kit.process import process_start
from paitient.services.kit.tls import TLSSetupError, client_context

log = logging.getLogger("paitient.services.relay")

MODULE = "paitient.services.relay"
HOME = "/home/researcher"
DATA = "/data"
SOCKETS = "/run/paitient"
"""An in-memory folder both containers of the pod mount (and no kernel's sandbox)."""
RUN_DIR = f"{SOCKETS}/services"
"""Where kernels find the services' sockets (bound read-only into each sandbox)."""
EGRESS_SOCKET = f"{SOCKETS}/egress.sock"
"""Where the server's egress gate asks: beside the launcher's socket, in no folder a kernel's sandbox binds."""
TOKEN_FILE = "/run/paitient-token/token"  # noqa: S105 (a path, not a secret)
"""Where the kernels container mounts the pod's token (a Secret of its own; not the sockets' folder)."""
SOCKET_MODE = 0o600
MAX_REPORTED = 4096
CHUNK = 1 << 16


class RelayError(ValueError):
    """The relay cannot start as configured; the message says what to fix."""


def relay_argv(python: str = "python") -> list[str]:
    return [python, "-I", "-m", MODULE]


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def check_token_file(path: str, bound: dict[str, str]) -> None:
    """Refuse a token file in anything a kernel's sandbox binds (``bound``: what -> folder) or in the system
    folders it binds (``/usr``, ``/etc``, the Python environment)."""
    path = os.path.normpath(os.path.abspath(path))
    folders = {**bound, "system": "/usr", "configuration": "/etc", "Python environment": sys.prefix}
    for what, folder in folders.items():
        if _inside(path, os.path.normpath(folder)):
            raise RelayError(
                f"the pod's token file {path} lies in the {what} folder {folder}, which a kernel's sandbox binds; "
                f"mount it elsewhere ({TOKEN_FILE})"
            )


def check_egress_socket(path: str, bound: dict[str, str]) -> None:
    """Refuse an egress socket in anything a kernel's sandbox binds: the gate serves the pod's server alone."""
    path = os.path.normpath(os.path.abspath(path))
    for what, folder in bound.items():
        if _inside(path, os.path.normpath(folder)):
            raise RelayError(
                f"the egress gate's socket {path} lies in the {what} folder {folder}, which a kernel's sandbox "
                f"binds; put it beside the launcher's socket ({EGRESS_SOCKET})"
            )


def live_processes(own: int) -> list[list[int | None]]:
    """[pid, start] of every live process this relay sees, but itself (its pid namespace's: the kernels)."""
    out: list[list[int | None]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == own:
            continue
        start = process_start(int(entry))
        if start is not None:
            out.append([int(entry), start])
        if len(out) >= MAX_REPORTED:
            break
    return out


class Relay:
    """The relay's decisions, apart from its sockets: :meth:`forward` carries one call to the gateway."""

    def __init__(
        self,
        gateway: tuple[str, int],
        token: str,
        limits: dict[str, int],
        uid: int | None = None,
        egress_socket: str = "",
        tls: ssl.SSLContext | None = None,
    ):
        """``tls``: the context that trusts the gateway's authority (None: plain TCP); the gateway's host name
        is the name its certificate must carry."""
        self.gateway = gateway
        self.tls = tls
        self.token = token
        self.limits = limits
        self.egress_socket = egress_socket
        """Where the egress gate's socket is served; empty: not at all."""
        self.uid = os.getuid() if uid is None else uid
        if self.uid == 0:
            raise RelayError("refusing to run as root: run the kernels container as the pod's user (runAsUser)")

    def admit(self, peer: Peer) -> None:
        if peer.uid != self.uid:
            raise ChannelError(
                f"uid {peer.uid} is not this pod's uid {self.uid}; the relay serves its own pod's kernels and "
                "server only",
                FORBIDDEN,
            )

    def admit_server(self, peer: Peer) -> None:
        """The egress gate's socket: the pod's server (another pid namespace, pid 0) and nothing else."""
        self.admit(peer)
        if peer.pid != 0:
            raise ChannelError(
                f"pid {peer.pid} is a process of the kernels' container; the egress gate serves the pod's server "
                "only, which checks every output there",
                FORBIDDEN,
            )

    def caller(self, peer: Peer) -> dict[str, Any]:
        """What the relay itself sees of the caller: a kernel (a pid it sees) or the server (pid 0)."""
        if peer.pid == 0:
            return {"origin": "server", "pid": 0, "start": None}
        return {"origin": "kernel", "pid": peer.pid, "start": process_start(peer.pid)}

    def sizes(self, service: str, fds: list[int]) -> list[int]:
        """Each passed file's size; a file that is not a regular one or larger than the service takes is
        refused before anything is sent."""
        limit = self.limits.get(service, 0)
        out = []
        for fd in fds:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ChannelError("a file passed to a service must be a regular file", "bad_request")
            if st.st_size > limit:
                raise ChannelError(
                    f"the file has {st.st_size} bytes; the {service} service takes at most {limit} bytes with a "
                    "call. Send a smaller file",
                    TOO_LARGE,
                )
            out.append(st.st_size)
        return out

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection(self.gateway, timeout=30)
        except OSError as e:
            raise ChannelError(
                f"the services' gateway is not reachable from this pod ({e.strerror or e}); try again, and tell "
                "the workspace operator if it keeps happening",
                UNAVAILABLE,
            ) from None
        if self.tls is None:
            return sock
        try:
            return self.tls.wrap_socket(sock, server_hostname=self.gateway[0])
        except ssl.SSLCertVerificationError as e:
            sock.close()
            raise ChannelError(
                f"the services' gateway at {self.gateway[0]} is not the one this pod trusts ({e.verify_message}); "
                "nothing was sent. Tell the workspace operator",
                UNAVAILABLE,
            ) from None
        except OSError as e:
            sock.close()
            raise ChannelError(
                f"the services' gateway is not reachable from this pod ({e.strerror or e}); try again, and tell "
                "the workspace operator if it keeps happening",
                UNAVAILABLE,
            ) from None

    def _answer(self, sock: socket.socket) -> bytes:
        def too_large() -> ChannelError:
            return ChannelError(f"the gateway's answer is larger than {MAX_ANSWER} bytes", "bad_answer")

        raw = read_line(lambda: sock.recv(CHUNK), MAX_ANSWER, too_large)
        if not raw:
            raise ChannelError("the services' gateway closed the connection without answering", UNAVAILABLE)
        return raw.split(b"\n", 1)[0] + b"\n"

    def forward(self, service: str, peer: Peer, msg: dict[str, Any], fds: list[int], timeout: float) -> bytes:
        """The gateway's answer line to the caller's request ``msg`` with ``fds``."""
        sizes = self.sizes(service, fds)
        header = {
            "token": self.token,
            "service": service,
            "op": msg["op"],
            "args": msg["args"],
            **self.caller(peer),
            "files": sizes,
        }
        with self._connect() as sock:
            sock.settimeout(timeout)
            sock.sendall(json.dumps(header).encode() + b"\n")
            for fd, size in zip(fds, sizes, strict=True):
                offset = 0
                while offset < size:
                    chunk = os.pread(fd, min(CHUNK, size - offset), offset)
                    if not chunk:  # the file shrank since: pad nothing, the gateway refuses a short file
                        raise ChannelError("the file changed while it was sent; send it again", "bad_request")
                    sock.sendall(chunk)
                    offset += len(chunk)
            return self._answer(sock)

    def open_stream(self, stream: str = "egress") -> socket.socket:
        """A connection to the gateway that carries ``stream`` once the gateway accepted it."""
        sock = self._connect()
        try:
            sock.settimeout(30)
            sock.sendall(json.dumps({"token": self.token, "stream": stream}).encode() + b"\n")
            answer = json.loads(self._answer(sock))
            if not isinstance(answer, dict) or not answer.get("ok"):
                error = answer.get("error") if isinstance(answer, dict) else None
                code = answer.get("code") if isinstance(answer, dict) else None
                raise ChannelError(str(error or "the gateway refused the stream"), str(code or UNAVAILABLE))
        except BaseException:
            sock.close()
            raise
        return sock

    def report(self) -> None:
        """Send the gateway the pod's live processes."""
        with self._connect() as sock:
            sock.settimeout(30)
            body = {"token": self.token, "report": live_processes(os.getpid())}
            sock.sendall(json.dumps(body).encode() + b"\n")
            answer = json.loads(self._answer(sock))
        if not answer.get("ok"):
            log.warning("relay: the gateway refused the pod's report: %s", answer.get("error"))


def make_relay(
    *,
    gateway: str,
    token_file: str,
    bound: dict[str, str],
    airlock_max_bytes: int,
    egress_socket: str = "",
    gateway_ca: str = "",
    plain_tcp: bool = False,
) -> Relay:
    """The relay of this pod: :class:`RelayError` as root, with a token file or an egress socket a sandbox binds
    (``bound``: what -> folder), an empty or unreadable token file, a gateway that is not ``host:port``, or
    neither the gateway's certificate authority (``gateway_ca``) nor ``plain_tcp``."""
    if os.getuid() == 0:
        raise RelayError("refusing to run as root: run the kernels container as the pod's user (runAsUser)")
    check_token_file(token_file, bound)
    if egress_socket:
        check_egress_socket(egress_socket, bound)
    try:
        token = Path(token_file).read_text().strip()
    except OSError as e:
        raise RelayError(f"cannot read the pod's token {token_file}: {e.strerror}") from None
    if not token:
        raise RelayError(f"the pod's token file {token_file} is empty")
    host, _, port = gateway.rpartition(":")
    if not host or not port.isdigit():
        raise RelayError(f"the gateway must be host:port, got {gateway!r}")
    if plain_tcp == bool(gateway_ca):
        raise RelayError(
            "give the gateway's certificate authority (--gateway-ca; the pod's token crosses the cluster's network "
            "inside TLS), or --plain-tcp where the cluster encrypts the pod network itself; not both"
            if plain_tcp
            else "the pod's token crosses the cluster's network: give the gateway's certificate authority "
            "(--gateway-ca), or --plain-tcp where the cluster encrypts the pod network itself"
        )
    try:
        tls = client_context(gateway_ca) if gateway_ca else None
    except TLSSetupError as e:
        raise RelayError(str(e)) from None
    return Relay((host, int(port)), token, limits_with(airlock_max_bytes), egress_socket=egress_socket, tls=tls)


def relay_of(options: Any) -> Relay:
    """:func:`make_relay` from an application's options: :class:`RelayApp`'s, or the pod launcher's, which runs
    the relay in its process and takes the same ones (gateway, token_file, home, data_root, run_dir,
    airlock_max_bytes, egress_socket, gateway_ca, plain_tcp)."""
    return make_relay(
        gateway=options.gateway,
        token_file=options.token_file,
        bound={"home": options.home, "data root": options.data_root, "run dir": options.run_dir},
        airlock_max_bytes=options.airlock_max_bytes,
        egress_socket=options.egress_socket,
        gateway_ca=options.gateway_ca,
        plain_tcp=options.plain_tcp,
    )


class _Handler(socketserver.BaseRequestHandler):
    server: RelaySocket

    def handle(self) -> None:
        sock: socket.socket = self.request
        server = self.server
        sock.settimeout(server.timeout_seconds)
        fds: list[int] = []
        try:
            peer = peer_of(sock)
            server.relay.admit(peer)
            msg, fds = read_request(sock, within=server.timeout_seconds)
            line = server.relay.forward(server.service, peer, msg, fds, server.timeout_seconds * 20)
        except ChannelError as e:
            line = json.dumps(e.to_wire()).encode() + b"\n"
        except TimeoutError:
            line = json.dumps(ChannelError("no complete request or answer in time", "timeout").to_wire()).encode()
            line += b"\n"
        except OSError as e:
            line = json.dumps(
                ChannelError(f"the call could not be carried ({e.strerror or e})", UNAVAILABLE).to_wire()
            ).encode()
            line += b"\n"
        finally:
            for fd in fds:
                os.close(fd)
        try:
            sock.sendall(line)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def refuse_frame(sock: socket.socket, error: ChannelError, timeout: float) -> None:
    """Answer the gate's first frame on ``sock`` with ``error`` in the gate's format; give up quietly on a
    caller that sends none (or not a frame): it is closed either way."""
    sock.settimeout(timeout)

    def exactly(n: int, keep: bool = True) -> bytes:
        return recv_exactly(sock, n, EOFError, keep=keep, chunk=CHUNK)

    try:
        head, size = read_header(exactly)
        exactly(size, keep=False)  # the piece it wanted checked: not forwarded, dropped
        sock.sendall(encode_frame({"id": head.get("id"), "ok": False, "code": error.code, "error": str(error)}))
    except (EOFError, FrameError, OSError):
        pass


class _EgressHandler(socketserver.BaseRequestHandler):
    server: RelaySocket

    def handle(self) -> None:
        sock: socket.socket = self.request
        relay = self.server.relay
        try:
            peer = peer_of(sock)
            relay.admit_server(peer)
            upstream = relay.open_stream("egress")
        except ChannelError as e:
            log.warning("relay: an egress connection refused: %s", e)
            refuse_frame(sock, e, self.server.timeout_seconds)
            return
        except (OSError, ValueError) as e:
            error = ChannelError(f"the egress stream could not be opened ({e})", UNAVAILABLE)
            refuse_frame(sock, error, self.server.timeout_seconds)
            return
        with upstream:
            splice(sock, upstream)


class RelaySocket(UnixSocketServer):
    """One service's socket in the pod, carried to the gateway."""

    def __init__(self, path: str, service: str, relay: Relay, timeout_seconds: float = 30.0):
        self.service = service
        self.relay = relay
        self.timeout_seconds = timeout_seconds
        handler = _EgressHandler if service == "egress" else _Handler
        super().__init__(path, handler, name=f"relay {service}", mode=SOCKET_MODE)


class RelayApp(Application):
    """``python -I -m paitient.services.relay``: serve the pod's services' sockets until SIGTERM."""

    name = "paitient-relay"
    version = __version__
    description = "The relay of a user's pod: the services' sockets, carried to the services' gateway."

    run_dir = Unicode(RUN_DIR, help="Folder of the services' sockets, bound read-only into each sandbox.").tag(
        config=True
    )
    home = Unicode(HOME, help="The user's home in the pod (every sandbox binds it).").tag(config=True)
    data_root = Unicode(DATA, help="The pod's data root (every sandbox binds datasets under it).").tag(config=True)
    token_file = Unicode(TOKEN_FILE, help="The pod's token, mounted in this container only.").tag(config=True)
    egress_socket = Unicode(
        EGRESS_SOCKET, help="The egress gate's socket, for the pod's server (where no sandbox binds); empty: none."
    ).tag(config=True)
    gateway = Unicode(f"paitient-services:{PORT}", help="The services' gateway, host:port.").tag(config=True)
    gateway_ca = Unicode("", help="The certificate authority (PEM) the gateway's certificate must come from.").tag(
        config=True
    )
    plain_tcp = Bool(False, help="Call the gateway without TLS (only where the cluster encrypts the pod network).").tag(
        config=True
    )
    report_seconds = Float(10.0, help="How often the pod's live processes are reported.").tag(config=True)
    airlock_max_bytes = Int(512 << 20, help="The largest file sent to the airlock ([airlock] max_bytes).").tag(
        config=True
    )

    aliases = {
        "run-dir": "RelayApp.run_dir",
        "home": "RelayApp.home",
        "data-root": "RelayApp.data_root",
        "token-file": "RelayApp.token_file",
        "egress-socket": "RelayApp.egress_socket",
        "gateway": "RelayApp.gateway",
        "gateway-ca": "RelayApp.gateway_ca",
        "report-seconds": "RelayApp.report_seconds",
        "airlock-max-bytes": "RelayApp.airlock_max_bytes",
        "log-level": "Application.log_level",
    }
    flags = {
        "plain-tcp": ({"RelayApp": {"plain_tcp": True}}, "Call the gateway without TLS (the cluster encrypts)."),
    }

    @default("log_level")
    def _log_level_default(self) -> int:
        return logging.INFO

    def make_relay(self) -> Relay:
        return relay_of(self)

    def start(self) -> None:
        from paitient.services.kit.process import StopSignal

        try:
            relay = self.make_relay()
        except RelayError as e:
            print(f"{self.name}: {e}", file=sys.stderr)
            self.exit(2)
            return
        stop = StopSignal()
        try:
            servers = start_relay(relay, self.run_dir, self.report_seconds, lambda: stop.received)
        except RelayError as e:
            print(f"{self.name}: {e}", file=sys.stderr)
            self.exit(2)
            return
        self.log.info(
            "relay: serving %s in %s and the egress gate at %s for uid %d",
            ", ".join(SERVICES),
            self.run_dir,
            relay.egress_socket or "(none)",
            relay.uid,
        )
        try:
            stop.wait()
        finally:
            stop_relay(servers)


def start_relay(relay: Relay, run_dir: str, report_seconds: float, stopped: Any) -> list[RelaySocket]:
    """Serve the services' sockets in ``run_dir`` and report the pod's processes every ``report_seconds``
    until ``stopped()``; the sockets, for :func:`stop_relay`. (The pod's launcher runs this in its own process
    when it is given the gateway and the token: one process for the kernels container.) :class:`RelayError`,
    with no socket left behind, when one cannot be made."""
    places = [(os.path.join(run_dir, f"{s}.sock"), s, 0o755) for s in SERVICES]
    if relay.egress_socket:
        places.append((relay.egress_socket, "egress", 0o700))
    servers: list[RelaySocket] = []
    try:
        for path, service, folder_mode in places:
            Path(path).parent.mkdir(mode=folder_mode, parents=True, exist_ok=True)
            servers.append(RelaySocket(path, service, relay))
    except OSError as e:
        stop_relay(servers, started=False)
        raise RelayError(
            f"cannot serve the {service} socket at {path}: {e.strerror or e}; give the pod's user a folder there"
        ) from None
    for server in servers:
        server.start_in_thread()

    def report() -> None:
        while not stopped():
            try:
                relay.report()
            except (ChannelError, OSError, ValueError) as e:
                log.warning("relay: could not report the pod's processes: %s", e)
            deadline = time.monotonic() + report_seconds
            while not stopped() and time.monotonic() < deadline:
                time.sleep(min(0.2, report_seconds))

    threading.Thread(target=report, name="relay-report", daemon=True).start()
    return servers


def stop_relay(servers: list[RelaySocket], *, started: bool = True) -> None:
    for server in servers:
        if started:
            server.shutdown()
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    RelayApp.launch_instance(argv)


if __name__ == "__main__":
    main()
