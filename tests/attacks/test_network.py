"""Network attacks from inside a sandboxed kernel: nothing reaches the host, other users or the outside.

Every target is a listener this test started on loopback (or an address in the sandbox's own network
namespace, which holds only ``lo``); after each attack, the stand-ins confirm nothing arrived.
"""

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _nothing_arrives(world):
    yield
    assert world.listeners.nothing_arrived(), "a connection or datagram reached a host listener"


@pytest.mark.parametrize("target", ["hub", "proxy_api", "hub_api", "directory"])
def test_tcp_to_hub_proxy_and_directory_is_refused(world, alice_kernel, target):
    port = world.listeners.port(target)
    out = alice_kernel.attempt(f"socket.create_connection(('127.0.0.1', {port}), timeout=5)")
    assert out["errno"] == "ECONNREFUSED", out


def test_tcp_to_another_users_server_is_refused(world, alice_kernel):
    out = alice_kernel.attempt(f"socket.create_connection(('127.0.0.1', {world.server_b.port}), timeout=5)")
    assert out["errno"] == "ECONNREFUSED", out


def test_tcp_to_own_server_api_is_refused(world, alice_kernel):
    out = alice_kernel.attempt(f"socket.create_connection(('127.0.0.1', {world.server_a.port}), timeout=5)")
    assert out["errno"] == "ECONNREFUSED", out


def test_tcp_over_ipv6_loopback_is_refused(world, alice_kernel):
    port = world.listeners.tcp6.getsockname()[1]
    out = alice_kernel.attempt(f"socket.create_connection(('::1', {port}), timeout=5)")
    assert out["errno"] == "ECONNREFUSED", out


def test_udp_to_host_loopback_never_arrives(world, alice_kernel):
    port = world.listeners.udp.getsockname()[1]
    # The datagram goes to the sandbox's own lo, where nobody listens: the next receive reports it.
    out = alice_kernel.attempt(
        f"(lambda s: (s.connect(('127.0.0.1', {port})), s.send(b'leak'), s.settimeout(2), s.recv(10)))"
        "(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))"
    )
    assert out["errno"] == "ECONNREFUSED", out


# "No way out" without sending anything off the machine: the sandbox's network namespace has no route and no
# resolver, read from inside; the loopback attacks above show what a connection attempt meets.
# The interface of every route: /proc/net/route names it first (after a header), ipv6_route last.
ROUTES = (
    "sorted({ln.split()[0] for ln in open('/proc/net/route').read().splitlines()[1:]} "
    "| {ln.split()[-1] for ln in open('/proc/net/ipv6_route').read().splitlines() if ln.strip()})"
)


def test_the_sandbox_has_no_route_but_loopback(alice_kernel):
    # IPv4: no entry at all in the main table (lo's routes live in the local table); IPv6: only lo's.
    out = alice_kernel.attempt(ROUTES)
    assert out["ok"] and out["value"] in ("[]", "['lo']"), out


def test_the_host_has_routes_the_sandbox_lacks(alice_kernel):
    # The same reading on the host is not empty: the check above can fail.
    host = {ln.split()[0] for ln in Path("/proc/net/route").read_text().splitlines()[1:] if ln.split()}
    assert host - {"lo"}, host


def test_the_sandbox_has_no_resolver(alice_kernel):
    out = alice_kernel.attempt(
        "[ln for f in ('/etc/resolv.conf', '/etc/hosts') if __import__('os').path.exists(f) "
        "for ln in open(f).read().splitlines() if ln.strip() and not ln.startswith('#')]"
    )
    assert out["ok"], out
    lines = eval(out["value"])  # noqa: S307 - the repr of a list of str that the test itself asked for
    assert not [ln for ln in lines if ln.split()[0] == "nameserver"], lines
    assert all(ln.split()[0] in ("127.0.0.1", "::1") for ln in lines), lines


def test_only_loopback_interface_exists(alice_kernel):
    out = alice_kernel.attempt("socket.if_nameindex()")
    assert out["ok"] and out["value"] == "[(1, 'lo')]", out


def test_raw_socket_is_refused(alice_kernel):
    out = alice_kernel.attempt("socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)")
    assert out["errno"] == "EPERM", out


def test_packet_socket_is_refused(alice_kernel):
    out = alice_kernel.attempt("socket.socket(socket.AF_PACKET, socket.SOCK_RAW)")
    assert out["errno"] == "EPERM", out


def test_hub_unix_socket_is_not_visible(world, alice_kernel):
    out = alice_kernel.attempt(f"socket.socket(socket.AF_UNIX).connect({str(world.hub_socket)!r})")
    assert out["errno"] == "ENOENT", out


def test_abstract_unix_socket_of_the_host_is_unreachable(world, alice_kernel):
    name = world.listeners.abstract_name
    out = alice_kernel.attempt(f"socket.socket(socket.AF_UNIX).connect('\\0{name}')")
    assert out["errno"] == "ECONNREFUSED", out


def test_service_socket_folder_cannot_take_a_fake_service(world, alice_kernel):
    fake = world.site.run_dir / "ledger.sock"
    out = alice_kernel.attempt(f"socket.socket(socket.AF_UNIX).bind({str(fake)!r})")
    assert out["errno"] == "EROFS", out


def test_kernel_sockets_of_another_user_are_not_visible(world, alice_kernel):
    runtime = f"{world.bob.pw_dir}/.local/share/jupyter/runtime"
    out = alice_kernel.attempt(f"os.listdir({runtime!r})")
    assert out["errno"] == "ENOENT", out


def test_outside_ipv6_address_is_unreachable(alice_kernel):
    out = alice_kernel.attempt("socket.create_connection(('2001:db8::1', 443), timeout=5)")
    assert out["errno"] == "ENETUNREACH", out


def _audit(alice_kernel, world, **args):
    return alice_kernel.attempt(
        f"__import__('paitient.channel', fromlist=['call']).call({str(world.site.run_dir / 'audit.sock')!r}, "
        f"'record', {args!r})"
    )


def test_service_socket_names_the_kernel_by_its_uid_not_by_its_claim(world, alice_kernel):
    out = _audit(alice_kernel, world, action="cell.execute", object="k", actor="bob")
    assert out["type"] == "ChannelError" and "actor comes from your connection" in out["msg"], out
    out = _audit(alice_kernel, world, action="cell.execute", object="k", details={"user": "bob"})
    assert out["type"] == "ChannelError" and "only yourself" in out["msg"], out
    out = _audit(alice_kernel, world, action="airlock.decision", object="r1")
    assert out["type"] == "ChannelError" and "may not be reported" in out["msg"], out


def test_what_a_kernel_reports_is_recorded_as_its_user_from_a_sandbox(world, alice_kernel):
    import json

    from paitient.services.audit.writer import trail_files

    out = _audit(alice_kernel, world, action="cell.execute", object="forged-by-kernel", details={"code": "x"})
    assert out["ok"], out
    recs = [
        json.loads(line)
        for _, path in trail_files(world.site.state_dir / "audit")
        for line in path.read_bytes().splitlines()
    ]
    mine = [r for r in recs if r["object"] == "forged-by-kernel"]
    assert len(mine) == 1 and mine[0]["actor"] == world.alice.pw_name
    assert mine[0]["details"]["peer"]["origin"] == "namespaced"  # marked as coming from inside a sandbox


@pytest.mark.parametrize("service", ["egress", "launcher"])
def test_the_gate_and_launcher_sockets_are_not_in_the_sandbox(world, alice_kernel, service):
    """Attack: from a kernel, connect to the egress service (which judges what leaves) and the sandbox
    launcher (which starts kernels) at their real paths in this running workspace. The same account outside
    the sandbox reaches them (so the sockets are live and their modes let it in); inside, the path is not
    there: the sandbox binds no part of ``<state_dir>/gate``."""
    import importlib
    import stat

    from tests import workspacegroup

    path = importlib.import_module(f"paitient.services.{service}").socket_path(world.site)
    assert stat.S_ISSOCK(path.stat().st_mode), path
    outside = subprocess.run(
        [
            "setpriv",
            f"--reuid={world.alice.pw_uid}",
            f"--regid={world.alice.pw_gid}",
            workspacegroup.setpriv_groups(),
            "--",
            sys.executable,
            "-c",
            f"import socket; socket.socket(socket.AF_UNIX).connect({str(path)!r}); print('connected')",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert outside.stdout.strip() == "connected", outside.stderr
    out = alice_kernel.attempt(f"socket.socket(socket.AF_UNIX).connect({str(path)!r})")
    assert out["errno"] == "ENOENT", out
    out = alice_kernel.attempt(f"os.listdir({str(path.parent)!r})")
    assert out["errno"] == "ENOENT", out
