"""The network of one researcher's server: its own namespace, reaching the hub's API and nothing else.

Run by the hub (root) in front of each user's server (standard library only, run as a script)::

    servernet.py --account pt-alice --groups 1001 --listen 127.0.0.1:PORT --hub-api 127.0.0.1:HUBPORT -- CMD...

1. It binds ``--listen`` on the host: the address the hub and the proxy know the server by.
2. It makes a new network namespace holding only ``lo`` (no other interface, no route, no resolver), brings
   ``lo`` up there and binds the hub API's address inside it.
3. It starts CMD (the server) in that namespace as ``--account`` with exactly ``--groups``, no capabilities,
   no new privileges (setuid programs do not raise them) and ``SIGTERM`` as its parent-death signal.
4. It copies bytes, unread, between the two pairs of sockets: connections to the host's ``--listen`` go to
   the server's port inside the namespace; connections to the hub API's address inside the namespace go to
   the hub's API on the host. Nothing else crosses: the directory, the proxy's API, other users' servers,
   the services' TCP ports and every other address on the host or beyond are unreachable from the server.

Unix sockets are not network-namespaced: the server still reaches the launcher and the egress service over
their socket files, which their modes and ``SO_PEERCRED`` guard.

SIGINT, SIGTERM and SIGHUP are passed on to the server; when it ends, this process ends with its status (a
signal's death as 128 + the signal). SIGKILL of this process ends the server through its parent-death
signal. The hub's LocalProcessSpawner knows this process as the server (pid, poll, stop).

``--hold`` (no ``--`` and no command) makes the same namespace and forwards the same two ways, but starts
nothing: this process moves into the namespace and stays there, so ``/proc/<its pid>/ns/net`` names it, and
a server that another program starts in it (a container that joins it, :mod:`paitient.hub.container`) gets
exactly what a server started here would. It prints ``servernet: holding <inode>`` once both sockets listen,
and ends at SIGINT, SIGTERM or SIGHUP (status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import fcntl
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable

CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
CHUNK = 256 * 1024
CONNECT_SECONDS = 10.0

_live: set[asyncio.Task] = set()
"""The connections being copied. The event loop holds tasks weakly and a stream's protocol holds its reader
weakly: once a peer has half-closed, nothing else may hold a waiting copy, which the collector would then
end, closing its connection mid-answer."""

_libc = ctypes.CDLL(None, use_errno=True)


class NetError(RuntimeError):
    """The namespace could not be made or entered: the server is not started."""


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise NetError(f"{what}: {os.strerror(err)} (errno {err})")


def unshare_net() -> None:
    _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET) (the hub must run as root)")


def setns_net(fd: int) -> None:
    _check(_libc.setns(fd, CLONE_NEWNET), "setns(network namespace)")


def loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        name = b"lo".ljust(16, b"\0")
        flags = struct.unpack_from("H", fcntl.ioctl(s, SIOCGIFFLAGS, name + b"\0" * 24), 16)[0]
        fcntl.ioctl(s, SIOCSIFFLAGS, name + struct.pack("H", flags | IFF_UP) + b"\0" * 22)


def ns_inode(path: str = "/proc/self/ns/net") -> int:
    return os.stat(path).st_ino


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}")
    if host != "127.0.0.1":
        raise argparse.ArgumentTypeError(f"only 127.0.0.1 is supported, got {host!r}")
    return host, int(port)


def listener(address: tuple[str, int]) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(address)
    s.listen(128)
    s.setblocking(False)
    return s


class Namespace:
    """The server's network namespace, and the way back to the host's (this process moves between them only
    to create a socket; it lives in the host's, or in the server's after :meth:`move_in`)."""

    def __init__(self) -> None:
        self.host_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.host_inode = ns_inode()
        unshare_net()
        try:
            loopback_up()
            self.fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            self.inode = ns_inode()
        finally:
            setns_net(self.host_fd)
        if ns_inode() != self.host_inode or self.inode == self.host_inode:
            raise NetError("could not return to the host's network namespace")
        self.home_fd = self.host_fd
        """The namespace this process lives in between the sockets it makes."""

    def _made_in(self, fd: int, make: Callable[[], socket.socket]) -> socket.socket:
        setns_net(fd)
        try:
            return make()
        finally:
            setns_net(self.home_fd)

    def host_socket(self, make: Callable[[], socket.socket]) -> socket.socket:
        """A socket made in the host's namespace."""
        return self._made_in(self.host_fd, make)

    def socket(self, make: Callable[[], socket.socket]) -> socket.socket:
        """A socket made inside the namespace (its namespace is fixed at creation)."""
        return self._made_in(self.fd, make)

    def move_in(self) -> None:
        """Live in the namespace from now on (``--hold``): ``/proc/<pid>/ns/net`` then names it."""
        self.home_fd = self.fd
        setns_net(self.fd)
        if ns_inode() != self.inode:
            raise NetError("could not move into the server's network namespace")

    def enter_as(self, uid: int, gid: int, groups: list[int]) -> Callable[[], None]:
        """The child's preexec function: into the namespace, then the account, then the parent-death signal
        (credential changes clear it, so it is set last)."""
        fd, inode = self.fd, self.inode

        def preexec() -> None:
            setns_net(fd)
            if ns_inode() != inode:
                raise NetError("the server is not in its network namespace")
            os.setgid(gid)
            os.setgroups(groups)
            os.setuid(uid)
            if os.getuid() != uid or os.geteuid() != uid or set(os.getgroups()) - {gid, *groups}:
                raise PermissionError("the server kept privileges it should have dropped")
            _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
            _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
            home = os.environ.get("HOME", "/")
            try:
                os.chdir(home)
            except OSError:
                os.chdir("/")

        return preexec


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:  # the other end is gone: closing this side ends the copy the other way too
        writer.close()


async def _pipe(
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    connect: Callable[[], socket.socket],
    target: tuple[str, int],
) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    _live.add(task)
    try:
        sock = connect()
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, target), CONNECT_SECONDS)
        except (TimeoutError, OSError):
            sock.close()
            client_w.close()
            return
        up_r, up_w = await asyncio.open_connection(sock=sock)
        try:
            await asyncio.gather(_copy(client_r, up_w), _copy(up_r, client_w))
        finally:
            for w in (up_w, client_w):
                w.close()
    finally:
        _live.discard(task)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    hold = "--hold" in args and "--" not in args
    if "--" not in args and not hold:
        print("servernet: usage: servernet.py OPTIONS -- COMMAND...  or  servernet.py --hold OPTIONS", file=sys.stderr)
        return 2
    cut = len(args) if hold else args.index("--")
    if "--hold" in args[:cut] and not hold:
        print("servernet: --hold starts nothing: no command after --", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="servernet")
    parser.add_argument("--account", required=not hold)
    parser.add_argument("--groups", default="", help="supplementary gids, comma-separated")
    parser.add_argument("--listen", required=True, type=parse_address)
    parser.add_argument("--hub-api", required=True, type=parse_address)
    parser.add_argument("--hold", action="store_true", help="start nothing; hold the namespace for a container")
    opts = parser.parse_args(args[:cut])
    command = args[cut + 1 :]
    if hold:
        return asyncio.run(run_hold(opts))
    if not command:
        parser.error("no server command after --")
    return asyncio.run(run(opts, command))


async def _forwarders(ns: Namespace, opts: argparse.Namespace) -> list[asyncio.Server]:
    """The two ways across: the host's ``--listen`` to the server's port inside, the hub API's address inside
    to the hub's API on the host."""
    outside = ns.host_socket(lambda: listener(opts.listen))
    inside = ns.socket(lambda: listener(opts.hub_api))

    def to_server() -> socket.socket:
        return ns.socket(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))

    def to_hub() -> socket.socket:
        return ns.host_socket(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))

    return [
        await asyncio.start_server(lambda r, w: _pipe(r, w, to_server, opts.listen), sock=outside),
        await asyncio.start_server(lambda r, w: _pipe(r, w, to_hub, opts.hub_api), sock=inside),
    ]


async def run_hold(opts: argparse.Namespace) -> int:
    ns = Namespace()
    servers = await _forwarders(ns, opts)
    ns.move_in()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"servernet: holding {ns.inode}; {opts.listen[0]}:{opts.listen[1]} forwarded in, "
        f"the hub API {opts.hub_api[0]}:{opts.hub_api[1]} out",
        flush=True,
    )
    await stop.wait()
    for server in servers:
        server.close()
    return 0


async def run(opts: argparse.Namespace, command: list[str]) -> int:
    import pwd

    pw = pwd.getpwnam(opts.account)
    if pw.pw_uid == 0:
        print("servernet: refusing to run a server as root", file=sys.stderr)
        return 2
    groups = [int(g) for g in opts.groups.split(",") if g]
    ns = Namespace()
    servers = await _forwarders(ns, opts)
    proc = await asyncio.create_subprocess_exec(
        *command, preexec_fn=ns.enter_as(pw.pw_uid, pw.pw_gid, groups), stdin=asyncio.subprocess.DEVNULL
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, _forward, proc, sig)
    print(
        f"servernet: server of {opts.account} (pid {proc.pid}) in its own network namespace; "
        f"{opts.listen[0]}:{opts.listen[1]} forwarded in, the hub API {opts.hub_api[0]}:{opts.hub_api[1]} out",
        file=sys.stderr,
        flush=True,
    )
    status = await proc.wait()
    for server in servers:
        server.close()
    return status if status >= 0 else 128 - status


def _forward(proc: asyncio.subprocess.Process, sig: int) -> None:
    if proc.returncode is None:
        proc.send_signal(sig)


if __name__ == "__main__":
    sys.exit(main())
