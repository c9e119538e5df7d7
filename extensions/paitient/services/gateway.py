"""The services' gateway: calls from users' Kubernetes pods, made to the services for the pod's user.

Process: ``python -I -m paitient.services.gateway``, in the services' pod, as a uid of its own (``[workspace]
gateway_uid``; never root). Trusted for: saying which pod, and so which user, a call comes from, and what
the pod's relay saw of the caller. It listens on TCP; each pod's relay (:mod:`paitient.services.relay`) opens
one connection per call and sends one header line, JSON::

    {"token", "service", "op", "args", "origin", "pid", "start", "files": [<size>, ...]}

followed by the bytes of each file, or ``{"token", "report": [[pid, start], ...]}`` (the pod's live
processes), or ``{"token", "stream": "egress"}`` (the pod's server's connection to the egress gate). The
gateway

1. looks the token up in the hub's token file (:class:`~paitient.podtokens.PodTokens`, hashes only): no
   token, an unknown or a revoked one is refused (``forbidden``) before anything else is read;
2. refuses a service it does not serve, a file larger than the service takes (``too_large``, before its bytes
   are read), and a header that is not the protocol (``bad_request``);
3. reads each file into a sealed in-memory file (``memfd_create``, then ``F_SEAL_SHRINK | F_SEAL_GROW |
   F_SEAL_WRITE | F_SEAL_SEAL``: the service reads exactly the bytes that came, and nobody can change them);
4. calls the service on its unix socket with ``on_behalf`` = the token's user's uid and pod, and the relay's
   origin, pid and start (the services take that from the gateway's uid only,
   :mod:`paitient.services.kit.channel`), and sends the service's answer line back.

A report goes to the ledger as ``pod_report`` on behalf of the pod's relay (origin ``relay``): it keeps
reservations made from the pod alive (:class:`~paitient.services.ledger.service.PodReports`).

A stream is the egress gate's one long connection (:mod:`paitient.server.gate`): the gateway opens the
egress service's socket, names the token's user's server in its first frame (``on_behalf``, origin
``server``: the relay admits the pod's server only), answers the relay one line (``{"ok": ...}``), and from
then on carries bytes both ways unread (:func:`~paitient.services.kit.pipe.splice`), the egress service
parsing every frame. It checks the token again every ``stream_check`` seconds (:data:`STREAM_CHECK`) and
ends the stream once it is revoked (the pod stopped or replaced).

TLS 1.3 (:mod:`paitient.services.kit.tls`): the gateway presents ``--tls-cert`` with ``--tls-key``, and each
relay trusts its own certificate authority only. It refuses to start without them unless told ``--plain-tcp``
(a cluster whose mesh or CNI encrypts the pod network already); see docs/kubernetes.md.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import socketserver
import ssl
import sys
import threading
from typing import Any

from traitlets import Bool, Float, Int, Unicode, default
from traitlets.config import Application

from paitient import __version__
from paitient.channel import (
    BAD_REQUEST,
    FORBIDDEN,
    MAX_FDS,
    MAX_REQUEST,
    TOO_LARGE,
    TOO_MANY_CONNECTIONS,
    UNAVAILABLE,
    ChannelError,
    call,
    read_line,
    recv_exactly,
)
from paitient.podtokens import PodIdentity, PodTokens, token_file
from paitient.rules.egress import ON_BEHALF, FrameError, encode_frame, read_header
from paitient.services.egress import socket_path as egress_socket
from paitient.services.kit.channel import PromptStop
from paitient.services.kit.pipe import keepalive, splice
from paitient.services.kit.tls import TLSSetupError, server_context

log = logging.getLogger("paitient.services.gateway")

MODULE = "paitient.services.gateway"
PORT = 8090
SERVICES = ("audit", "ledger", "airlock", "jobs")
"""The services a pod reaches through the gateway: those its kernels and server call over a socket."""
JOBS_MAX_BYTES = 2_000_000
"""What the jobs service takes (``jobs.service.MAX_GRAPH_BYTES``): a model's exported graph."""
MAX_HEADER = MAX_REQUEST + 8192
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
CALL_TIMEOUT = 600.0
PER_ADDRESS = 32
"""Connections one address (a pod) may hold at once; its relay makes one per call of its kernels and server."""
TOTAL = 512
HEADER_KEYS = frozenset({"token", "service", "op", "args", "origin", "pid", "start", "files"})
FILES_PER_POD = 2
"""Calls' worth of files (each up to its service's largest) one pod may have the gateway hold at once."""
FILES_TOTAL = 8
"""Calls' worth of files the gateway holds at once for all pods. Files are held in memory (sealed memfds,
charged to the gateway, not to the pod) from the first byte until the service has answered."""
REPORT_KEYS = frozenset({"token", "report"})
STREAM_KEYS = frozenset({"token", "stream"})
STREAMS = ("egress",)
STREAM_CHECK = 30.0
"""Seconds between two checks that a stream's token is still the pod's."""


def limits_with(airlock_max_bytes: int) -> dict[str, int]:
    """The largest file each service takes with a call (0: none at all), given the airlock's limit: what the
    gateway enforces and the pod's relay checks before sending, from one table."""
    return {"audit": 0, "ledger": 0, "airlock": int(airlock_max_bytes), "jobs": JOBS_MAX_BYTES}


def file_limits(site: Any) -> dict[str, int]:
    """:func:`limits_with` the site's ``[airlock] max_bytes``."""
    return limits_with(site.airlock.max_bytes)


def sealed_file(name: str, receive_into: Any, size: int) -> int:
    """A sealed memfd holding the next ``size`` bytes ``receive_into(buffer) -> n`` gives."""
    fd = os.memfd_create(f"paitient-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        buf = bytearray(1 << 16)
        left = size
        while left:
            n = receive_into(memoryview(buf)[: min(len(buf), left)])
            if not n:
                raise ChannelError("the relay closed the connection before the whole file came", BAD_REQUEST)
            view = memoryview(buf)[:n]
            while view:
                view = view[os.write(fd, view) :]
            left -= n
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


class HeldBytes:
    """The bytes of files the gateway holds for calls under way, per pod and in all, each bounded: taken
    before the first byte of a call's files is read, given back when its service has answered."""

    def __init__(self, per_pod: int, total: int):
        self.per_pod = per_pod
        self.total = total
        self._lock = threading.Lock()
        self._pods: dict[str, int] = {}
        self._all = 0

    def take(self, pod: str, n: int) -> None:
        with self._lock:
            mine = self._pods.get(pod, 0)
            if mine + n > self.per_pod:
                raise ChannelError(
                    f"the gateway holds {mine} bytes of files for your pod's calls under way, and takes at most "
                    f"{self.per_pod} at once; wait for them to finish and try again",
                    TOO_MANY_CONNECTIONS,
                )
            if self._all + n > self.total:
                raise ChannelError(
                    f"the gateway holds {self._all} bytes of files for calls under way, the most it takes at once; "
                    "try again in a moment, and tell the workspace operator if it keeps happening",
                    UNAVAILABLE,
                )
            self._pods[pod] = mine + n
            self._all += n

    def give_back(self, pod: str, n: int) -> None:
        with self._lock:
            left = self._pods.get(pod, 0) - n
            if left > 0:
                self._pods[pod] = left
            else:
                self._pods.pop(pod, None)
            self._all -= n


class Gateway:
    """The gateway's decisions, apart from the TCP server: :meth:`serve` answers one connection."""

    def __init__(
        self, site: Any, tokens: PodTokens | None = None, timeout: float = 60.0, stream_check: float = STREAM_CHECK
    ):
        self.site = site
        self.tokens = tokens or PodTokens(token_file(site.state_dir))
        self.limits = file_limits(site)
        largest = max(self.limits.values())
        self.held = HeldBytes(FILES_PER_POD * largest, FILES_TOTAL * largest)
        self.run_dir = str(site.run_dir)
        self.timeout = timeout
        self.stream_check = stream_check

    def identify(self, header: dict[str, Any]) -> PodIdentity:
        token = header.get("token")
        if not token:
            raise ChannelError("the call carries no pod token; the gateway serves users' pods only", FORBIDDEN)
        who = self.tokens.lookup(token)
        if who is None:
            raise ChannelError(
                "the call's pod token is not one the hub issued to a running pod (unknown or revoked)", FORBIDDEN
            )
        return who

    def serve(self, sock: socket.socket) -> dict[str, Any] | None:
        """The answer to one call or report; None for a stream, which answered and ran until it ended."""
        sock.settimeout(self.timeout)

        def too_large() -> ChannelError:
            return ChannelError(f"header larger than {MAX_HEADER} bytes", TOO_LARGE)

        raw = read_line(lambda: sock.recv(65536), MAX_HEADER, too_large)
        line, _, rest = raw.partition(b"\n")
        try:
            header = json.loads(line)
        except (ValueError, RecursionError):
            header = None
        if not isinstance(header, dict):
            raise ChannelError("the gateway takes one JSON header line per call", BAD_REQUEST)
        who = self.identify(header)
        if "report" in header:
            return self._report(who, header)
        if "stream" in header:
            self._stream(who, header, sock, rest)
            return None
        return self._call(who, header, sock, bytearray(rest))

    def _report(self, who: PodIdentity, header: dict[str, Any]) -> dict[str, Any]:
        if set(header) != REPORT_KEYS:
            raise ChannelError(f"a report is {sorted(REPORT_KEYS)}", BAD_REQUEST)
        on_behalf = {"uid": who.uid, "pod": who.pod, "origin": "relay", "pid": 0, "start": None}
        result = call(
            os.path.join(self.run_dir, "ledger.sock"),
            "pod_report",
            {"kernels": header["report"]},
            on_behalf=on_behalf,
            timeout=self.timeout,
        )
        return {"ok": True, "result": result}

    def _stream(self, who: PodIdentity, header: dict[str, Any], sock: socket.socket, early: bytes) -> None:
        if set(header) != STREAM_KEYS or header["stream"] not in STREAMS:
            raise ChannelError(f"a stream is {sorted(STREAM_KEYS)}, stream one of {', '.join(STREAMS)}", BAD_REQUEST)
        token = header["token"]
        gate = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            gate.settimeout(self.timeout)
            path = egress_socket(self.site)
            try:
                gate.connect(str(path))
            except OSError as e:
                raise ChannelError(
                    f"the egress service is not reachable ({e.strerror or e}); outputs are withheld until it is",
                    UNAVAILABLE,
                ) from None
            on_behalf = {"uid": who.uid, "pod": who.pod, "origin": "server", "pid": 0, "start": None}
            gate.sendall(encode_frame({"id": 0, "op": ON_BEHALF, "on_behalf": on_behalf}))
            head = _read_frame(gate)
            if not head.get("ok"):
                raise ChannelError(str(head.get("error") or "refused"), str(head.get("code") or FORBIDDEN))
            accepted = {"ok": True, "result": {"user": head.get("user"), "pod": who.pod}}
            sock.sendall(json.dumps(accepted).encode() + b"\n")
            if early:
                gate.sendall(early)
            keepalive(sock)
            ended = splice(sock, gate, alive=lambda: self.tokens.lookup(token) == who, every=self.stream_check)
            log.info("gateway: the egress stream of pod %s (%s) %s", who.pod, who.user, ended)
        finally:
            gate.close()

    def _call(self, who: PodIdentity, header: dict[str, Any], sock: socket.socket, early: bytearray) -> dict[str, Any]:
        if set(header) != HEADER_KEYS:
            raise ChannelError(f"a call is {sorted(HEADER_KEYS)}", BAD_REQUEST)
        service, op, args, files = header["service"], header["op"], header["args"], header["files"]
        if service not in SERVICES:
            raise ChannelError(f"the gateway serves {', '.join(SERVICES)}, not {service!r}", BAD_REQUEST)
        if not isinstance(op, str) or not isinstance(args, dict):
            raise ChannelError("op must be a string and args an object", BAD_REQUEST)
        if not isinstance(files, list) or len(files) > MAX_FDS or any(type(n) is not int or n < 0 for n in files):
            raise ChannelError(f"files must be at most {MAX_FDS} sizes", BAD_REQUEST)
        limit = self.limits[service]
        for n in files:
            if n > limit:
                raise ChannelError(
                    f"the {service} service takes files of at most {limit} bytes with a call; this one has {n}",
                    TOO_LARGE,
                )
        if sum(files) > limit:  # one file sent four times was four times the limit in memory
            raise ChannelError(
                f"the {service} service takes at most {limit} bytes of files with a call; these have {sum(files)}",
                TOO_LARGE,
            )
        self.held.take(who.pod, sum(files))
        try:
            return self._forward(who, header, sock, early)
        finally:
            self.held.give_back(who.pod, sum(files))

    def _forward(
        self, who: PodIdentity, header: dict[str, Any], sock: socket.socket, early: bytearray
    ) -> dict[str, Any]:
        service, op, args, files = header["service"], header["op"], header["args"], header["files"]

        def receive_into(view: memoryview) -> int:
            if early:
                n = min(len(view), len(early))
                view[:n] = early[:n]
                del early[:n]
                return n
            return sock.recv_into(view)

        fds: list[int] = []
        try:
            for n in files:
                fds.append(sealed_file(service, receive_into, n))
            on_behalf = {
                "uid": who.uid,
                "pod": who.pod,
                "origin": header["origin"],
                "pid": header["pid"],
                "start": header["start"],
            }
            result = call(
                os.path.join(self.run_dir, f"{service}.sock"),
                op,
                args,
                fds=fds,
                on_behalf=on_behalf,
                timeout=CALL_TIMEOUT,
            )
        finally:
            for fd in fds:
                os.close(fd)
        return {"ok": True, "result": result}


def _read_frame(sock: socket.socket) -> dict[str, Any]:
    """One frame's header from the egress service (its payload, if any, is read and dropped)."""

    def exactly(n: int, keep: bool = True) -> bytes:
        return recv_exactly(
            sock,
            n,
            lambda: ChannelError("the egress service closed the connection without answering", UNAVAILABLE),
            keep=keep,
        )

    try:
        head, size = read_header(exactly)
        exactly(size, keep=False)
    except TimeoutError:
        raise ChannelError("the egress service did not answer in time", UNAVAILABLE) from None
    except FrameError as e:
        raise ChannelError(f"the egress service's answer is not a frame: {e}", UNAVAILABLE) from None
    return head


class _Handler(socketserver.BaseRequestHandler):
    server: GatewayServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        tls = self.server.tls
        if tls is not None:
            sock.settimeout(self.server.gateway.timeout)
            try:
                sock = tls.wrap_socket(sock, server_side=True)  # takes the connection over
            except (ssl.SSLError, OSError) as e:
                log.warning("gateway: no TLS connection with %s: %s", self.client_address[0], e)
                return
        try:
            self._answer(sock)
        finally:
            if tls is not None:
                sock.close()

    def _answer(self, sock: socket.socket) -> None:
        try:
            answer = self.server.gateway.serve(sock)
            if answer is None:  # a stream: answered, and over
                return
        except ChannelError as e:
            answer = e.to_wire()
        except TimeoutError:
            answer = ChannelError("no complete call came in time", BAD_REQUEST).to_wire()
        except OSError:
            return
        except Exception:
            log.exception("gateway: a call failed")
            answer = ChannelError("internal error in the gateway; see its log", "internal").to_wire()
        try:
            sock.sendall(json.dumps(answer, default=str).encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class GatewayServer(PromptStop, socketserver.ThreadingMixIn, socketserver.TCPServer):
    """The TCP server: a thread per connection, at most :data:`PER_ADDRESS` connections at once from one
    address (a pod) and :data:`TOTAL` in all; a connection over either is closed unanswered before its
    thread starts, so one pod holding connections open cannot take the gateway from the others."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], gateway: Gateway, tls: ssl.SSLContext | None = None):
        """``tls``: the gateway's TLS context (:func:`~paitient.services.kit.tls.server_context`); None: plain TCP."""
        self.gateway = gateway
        self.tls = tls
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self._held: dict[int, str] = {}
        super().__init__(address, _Handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        with self._lock:
            if self._open.get(host, 0) >= PER_ADDRESS or len(self._held) >= TOTAL:
                log.warning("gateway: %s holds too many connections; one more closed unanswered", host)
                return False
            self._open[host] = self._open.get(host, 0) + 1
            self._held[id(request)] = host
        return True

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            host = self._held.pop(id(request), None)
            if host is not None:
                left = self._open[host] - 1
                if left:
                    self._open[host] = left
                else:
                    del self._open[host]
        super().shutdown_request(request)


class GatewayApp(Application):
    """``python -I -m paitient.services.gateway``: serve users' pods until SIGTERM."""

    name = "paitient-gateway"
    version = __version__
    description = "The services' gateway: calls from users' pods, made to the services for the pod's user."

    site_file = Unicode("", help="The site configuration (TOML); empty: the default place.").tag(config=True)
    ip = Unicode("0.0.0.0", help="The address to listen on (the services' pod's).").tag(config=True)  # noqa: S104
    port = Int(PORT, help="The TCP port to listen on.").tag(config=True)
    stream_check = Float(
        STREAM_CHECK, help="Seconds between two checks of an egress stream's pod token (a revoked one ends it)."
    ).tag(config=True)
    tls_cert = Unicode("", help="The gateway's TLS certificate chain (PEM), for the name the relays call.").tag(
        config=True
    )
    tls_key = Unicode("", help="The key of the TLS certificate (PEM, unencrypted).").tag(config=True)
    plain_tcp = Bool(
        False, help="Serve without TLS: only where the cluster's mesh or CNI encrypts the pod network."
    ).tag(config=True)

    aliases = {
        "site": "GatewayApp.site_file",
        "ip": "GatewayApp.ip",
        "port": "GatewayApp.port",
        "stream-check": "GatewayApp.stream_check",
        "tls-cert": "GatewayApp.tls_cert",
        "tls-key": "GatewayApp.tls_key",
    }
    flags = {
        "plain-tcp": ({"GatewayApp": {"plain_tcp": True}}, "Serve without TLS (the cluster encrypts the pod network)."),
    }

    @default("log_level")
    def _log_level_default(self) -> int:
        return logging.INFO

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context, None with ``--plain-tcp``; :class:`TLSSetupError` when neither is given (or both)."""
        if self.plain_tcp:
            if self.tls_cert or self.tls_key:
                raise TLSSetupError("--plain-tcp and a TLS certificate exclude each other; give one of them")
            return None
        if not (self.tls_cert and self.tls_key):
            raise TLSSetupError(
                "the pods' calls cross the cluster's network: give the gateway's certificate and key (--tls-cert, "
                "--tls-key; docs/kubernetes.md), or --plain-tcp where the cluster encrypts the pod network itself"
            )
        return server_context(self.tls_cert, self.tls_key)

    def start(self) -> None:
        from paitient.config import load
        from paitient.services.kit.process import StopSignal

        site = load(self.site_file or None)
        uid = os.getuid()
        if uid == 0 or uid != site.workspace.gateway_uid:
            print(
                f"{self.name}: runs as [workspace] gateway_uid ({site.workspace.gateway_uid or 'not set'}), never "
                f"root; this process is uid {uid}",
                file=sys.stderr,
            )
            self.exit(2)
            return
        try:
            tls = self.tls_context()
        except TLSSetupError as e:
            print(f"{self.name}: {e}", file=sys.stderr)
            self.exit(2)
            return
        server = GatewayServer((self.ip, self.port), Gateway(site, stream_check=self.stream_check), tls)
        stop = StopSignal()
        threading.Thread(target=server.serve_forever, name="gateway", daemon=True).start()
        how = "TLS" if tls is not None else "plain TCP (--plain-tcp)"
        print(f"{self.name}: listening on {self.ip}:{server.server_address[1]}, {how}", file=sys.stderr, flush=True)
        try:
            stop.wait()
        finally:
            server.shutdown()
            server.server_close()


def main(argv: list[str] | None = None) -> None:
    GatewayApp.launch_instance(argv)


if __name__ == "__main__":
    main()
