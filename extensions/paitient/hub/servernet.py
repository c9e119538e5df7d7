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
import ctypes
import errno
import fcntl
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable

CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
CHUNK = 256 * 1024
CONNECT_SECONDS = 10.0

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


class Loop:
    """One thread waiting on every socket at once (no asyncio: that import alone is about 5 MiB in each of
    these processes, one per server). Owners register what they wait for with :meth:`want`; signals that
    :meth:`catch` was given come back from :meth:`step`."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.watching: dict[socket.socket, int] = {}
        self.timers: dict[object, tuple[float, Callable[[], None]]] = {}
        """Per owner, one deadline and what to call then."""
        self.caught: list[int] = []
        self._wake, wake_w = socket.socketpair()
        for s in (self._wake, wake_w):
            s.setblocking(False)
        self._wake_w = wake_w  # kept open: the signal handler writes the signal's number to it
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        self.want(self._wake, self, selectors.EVENT_READ)

    def catch(self, sig: int) -> None:
        """Report ``sig`` from :meth:`step` instead of its default action."""
        signal.signal(sig, lambda *_: None)  # the interpreter writes its number to the wake-up socket

    def ready(self, sock: socket.socket, events: int) -> None:
        try:
            self.caught.extend(sock.recv(64))
        except BlockingIOError:
            pass

    def want(self, sock: socket.socket, owner: object, events: int) -> None:
        """Wait for ``events`` on ``sock`` (none: stop waiting) and call ``owner.ready(sock, events)``."""
        had = self.watching.get(sock, 0)
        if events == had:
            return
        if not events:
            self.selector.unregister(sock)
            del self.watching[sock]
            return
        if had:
            self.selector.modify(sock, events, owner)
        else:
            self.selector.register(sock, events, owner)
        self.watching[sock] = events

    def step(self) -> list[int]:
        """Wait for the next events and handle them; the signals caught meanwhile."""
        timeout = None
        if self.timers:
            timeout = max(0.0, min(at for at, _ in self.timers.values()) - time.monotonic())
        for key, events in self.selector.select(timeout):
            key.data.ready(key.fileobj, events)
        now = time.monotonic()
        for owner, (at, then) in list(self.timers.items()):
            if at <= now:
                del self.timers[owner]
                then()
        caught, self.caught = self.caught, []
        return caught


class Acceptor:
    """A listener: each connection it accepts is relayed to ``target`` over a socket ``connect`` makes (in
    the namespace on the other side)."""

    def __init__(
        self, loop: Loop, listener: socket.socket, connect: Callable[[], socket.socket], target: tuple[str, int]
    ):
        self.loop, self.listener, self.connect, self.target = loop, listener, connect, target
        self.resume()

    def resume(self) -> None:
        self.loop.want(self.listener, self, selectors.EVENT_READ)

    def ready(self, sock: socket.socket, events: int) -> None:
        while True:
            try:
                client, _ = sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError:  # out of descriptors or memory: the next clients wait in the backlog a second
                self.loop.want(sock, self, 0)
                self.loop.timers[self] = (time.monotonic() + 1.0, self.resume)
                return
            client.setblocking(False)
            try:
                upstream = self.connect()
            except OSError:
                client.close()
                continue
            upstream.setblocking(False)
            Relay(self.loop, client, upstream, self.target)

    def close(self) -> None:
        self.loop.timers.pop(self, None)
        self.loop.want(self.listener, self, 0)
        self.listener.close()


class Relay:
    """One connection across: ``client`` (accepted) and ``upstream`` (connecting to ``target``), bytes copied
    unread both ways. A way reads only once what it read before is written, so a slow reader slows its writer;
    an end-of-file is passed on as a half-close once everything before it is written. An error on either
    socket, or an upstream that does not accept within ``CONNECT_SECONDS``, closes both."""

    def __init__(self, loop: Loop, client: socket.socket, upstream: socket.socket, target: tuple[str, int]):
        self.loop, self.client, self.upstream = loop, client, upstream
        self.connected = self.closed = False
        self.pending = {client: b"", upstream: b""}
        """What was read from each socket and waits to be written to the other."""
        self.ended: set[socket.socket] = set()
        """The sockets that reached their end-of-file, passed on to the other."""
        if upstream.connect_ex(target) not in (0, errno.EINPROGRESS):
            self.close()
            return
        loop.timers[self] = (time.monotonic() + CONNECT_SECONDS, self.close)
        loop.want(upstream, self, selectors.EVENT_WRITE)

    def other(self, sock: socket.socket) -> socket.socket:
        return self.upstream if sock is self.client else self.client

    def ready(self, sock: socket.socket, events: int) -> None:
        if self.closed:  # closed earlier in the same round of events
            return
        try:
            if not self.connected:  # only the upstream is watched until it accepts
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    raise ConnectionRefusedError
                self.connected = True
                self.loop.timers.pop(self, None)
            else:
                if events & selectors.EVENT_WRITE:
                    self._write(self.other(sock))
                if events & selectors.EVENT_READ:
                    self._read(sock)
        except OSError:
            self.close()
            return
        self._watch()

    def _read(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(CHUNK)
        except BlockingIOError:  # nothing to read after all
            return
        if not data:
            self.ended.add(sock)
        self.pending[sock] = data
        self._write(sock)

    def _write(self, source: socket.socket) -> None:
        """Write what was read from ``source`` to the other socket, as much as it takes now, and then the
        end-of-file, if ``source`` has reached it."""
        target, data = self.other(source), self.pending[source]
        if data:
            try:
                sent = target.send(data)
            except BlockingIOError:
                sent = 0
            self.pending[source] = data = data[sent:]
        if not data and source in self.ended:
            target.shutdown(socket.SHUT_WR)

    def _watch(self) -> None:
        if self.closed:
            return
        if len(self.ended) == 2 and not any(self.pending.values()):
            self.close()
            return
        events = {self.client: 0, self.upstream: 0}
        for source in (self.client, self.upstream):
            if self.pending[source]:
                events[self.other(source)] |= selectors.EVENT_WRITE
            elif source not in self.ended:
                events[source] |= selectors.EVENT_READ
        for sock, mask in events.items():
            self.loop.want(sock, self, mask)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.timers.pop(self, None)
        for sock in (self.client, self.upstream):
            self.loop.want(sock, self, 0)
            sock.close()


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
        return run_hold(opts)
    if not command:
        parser.error("no server command after --")
    return run(opts, command)


def _forwarders(loop: Loop, ns: Namespace, opts: argparse.Namespace) -> list[Acceptor]:
    """The two ways across: the host's ``--listen`` to the server's port inside, the hub API's address inside
    to the hub's API on the host."""
    outside = ns.host_socket(lambda: listener(opts.listen))
    inside = ns.socket(lambda: listener(opts.hub_api))

    def to_server() -> socket.socket:
        return ns.socket(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))

    def to_hub() -> socket.socket:
        return ns.host_socket(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))

    return [Acceptor(loop, outside, to_server, opts.listen), Acceptor(loop, inside, to_hub, opts.hub_api)]


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run_hold(opts: argparse.Namespace) -> int:
    ns = Namespace()
    loop = Loop()
    acceptors = _forwarders(loop, ns, opts)
    ns.move_in()
    for sig in STOP_SIGNALS:
        loop.catch(sig)
    print(
        f"servernet: holding {ns.inode}; {opts.listen[0]}:{opts.listen[1]} forwarded in, "
        f"the hub API {opts.hub_api[0]}:{opts.hub_api[1]} out",
        flush=True,
    )
    while not loop.step():
        pass
    for acceptor in acceptors:
        acceptor.close()
    return 0


def run(opts: argparse.Namespace, command: list[str]) -> int:
    import pwd

    pw = pwd.getpwnam(opts.account)
    if pw.pw_uid == 0:
        print("servernet: refusing to run a server as root", file=sys.stderr)
        return 2
    groups = [int(g) for g in opts.groups.split(",") if g]
    ns = Namespace()
    loop = Loop()
    acceptors = _forwarders(loop, ns, opts)
    proc = subprocess.Popen(command, preexec_fn=ns.enter_as(pw.pw_uid, pw.pw_gid, groups), stdin=subprocess.DEVNULL)
    for sig in (*STOP_SIGNALS, signal.SIGCHLD):
        loop.catch(sig)
    print(
        f"servernet: server of {opts.account} (pid {proc.pid}) in its own network namespace; "
        f"{opts.listen[0]}:{opts.listen[1]} forwarded in, the hub API {opts.hub_api[0]}:{opts.hub_api[1]} out",
        file=sys.stderr,
        flush=True,
    )
    proc.poll()  # it may have ended before SIGCHLD was caught
    while proc.returncode is None:
        for caught in loop.step():
            if caught == signal.SIGCHLD:
                proc.poll()
            else:
                proc.send_signal(caught)  # passed on; nothing once the server has ended
    for acceptor in acceptors:
        acceptor.close()
    status = proc.returncode
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main())
