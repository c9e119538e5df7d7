"""A pod's relay and the services' gateway, run for real on loopback: the real ledger, audit and airlock
services (root, as on a host, their sockets in the site's run dir), the gateway as an account of its own
(``[workspace] gateway_uid``), the relay as the pod's user with the pod's token in a file only it reads."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from paitient import podtokens
from paitient.config import load
from paitient.registry import Member, Registry
from tests import rootmember, workspacegroup
from tests.server.harness import service_process

SITE = """
[workspace]
state_dir = "{state}"
gateway_uid = {gateway_uid}

[[projects]]
name = "oncology"
group = "oncology"
datasets = ["breast_cancer"]
stewards = ["sam"]
budget = {{ epsilon = 10.0, delta = 1e-5 }}

[[projects]]
name = "cardio"
group = "cardio"
datasets = ["diabetes"]
stewards = ["sam"]
budget = {{ epsilon = 5.0, delta = 1e-5 }}
"""

CALL = """
import json, os, sys
from paitient import channel
request = json.loads(sys.argv[2])
fds = [os.open(p, os.O_RDONLY) for p in request.pop("files", [])]
raw = request.pop("raw", None)
try:
    if raw is not None:  # a request line as the caller writes it, whatever it says
        import socket
        s = socket.socket(socket.AF_UNIX)
        s.connect(sys.argv[1])
        s.sendall(json.dumps(raw).encode() + b"\\n")
        answer = channel.decode_answer(s.makefile("rb").readline(), sys.argv[1])
    else:
        answer = channel.call(sys.argv[1], request["op"], request.get("args"), fds=fds, timeout=60,
                              on_behalf=request.get("on_behalf"))
    print(json.dumps({"ok": answer, "pid": os.getpid()}))
except channel.ChannelError as e:
    print(json.dumps({"error": str(e), "code": e.code, "pid": os.getpid()}))
"""


def as_account(pw, *, groups: str | None = None) -> list[str]:
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", groups or workspacegroup.setpriv_groups()]


def call_as(pw, sock: Path, request: dict[str, Any]) -> dict[str, Any]:
    """One request to ``sock`` from a process of ``pw`` (None: root), as a kernel or server would send it;
    the answer (``ok``) or the refusal (``error``, ``code``), and the sender's pid."""
    who = [] if pw is None else as_account(pw)
    r = subprocess.run(
        [*who, sys.executable, "-c", textwrap.dedent(CALL), str(sock), json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``argv`` to its end, with ``stdin``, a bare environment and its output captured."""
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def only_child(pid: int) -> int:
    """The one child of ``pid`` (the process ``unshare --fork`` started in its pid namespace)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(children[0]) if children else pid


@contextlib.contextmanager
def account_process(
    argv: list[str], log_path: Path, ready: Any, *, in_namespace: bool = False, within: float = 60.0
) -> Iterator[subprocess.Popen]:
    """``argv`` started, yielded once ``ready()`` is true (within ``within`` seconds); ended by its pid (SIGTERM,
    then SIGKILL). ``in_namespace``: ``argv`` is ``unshare --fork ...``: the process it started is the one
    signalled."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env={"PATH": "/usr/bin:/bin"})
    try:
        deadline = time.monotonic() + within
        while not ready():
            assert proc.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, f"{argv[-1]} did not get ready: {log_path.read_text()}"
            time.sleep(0.05)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            os.kill(only_child(proc.pid) if in_namespace else proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class Pod:
    """The world of one test: the site, the pod's user (``alice``) and its token, the relay's socket folder."""

    site: Any
    user: Any
    other: Any
    gateway: Any
    identity: podtokens.PodIdentity
    token: str
    token_path: Path
    gateway_port: int
    sockets: Path
    tmp: Path
    authority: Path
    """The certificate authority of the gateway's TLS certificate, which the relay trusts."""

    @property
    def run_dir(self) -> Path:
        return self.sockets / "services"

    def sock(self, service: str) -> Path:
        return self.run_dir / f"{service}.sock"

    @property
    def egress_sock(self) -> Path:
        """The egress gate's socket the relay serves: beside the launcher's, not among the services'."""
        return self.sockets / "egress.sock"

    def tokens_file(self) -> Path:
        return podtokens.token_file(self.site.state_dir)

    def relay_argv(self, *extra: str, own_pids: bool = False) -> list[str]:
        """The relay's command; an option in ``extra`` replaces the pod's own."""
        options = [
            f"--run-dir={self.run_dir}",
            f"--home={self.user.pw_dir}",
            f"--data-root={self.tmp / 'data'}",
            f"--token-file={self.token_path}",
            f"--gateway=127.0.0.1:{self.gateway_port}",
            "--report-seconds=0.3",
            f"--egress-socket={self.egress_sock}",
            f"--gateway-ca={self.authority}",
        ]
        given = {e.split("=", 1)[0] for e in extra}
        return [
            *(("unshare", "--pid", "--fork", "--mount-proc", "--kill-child") if own_pids else ()),
            *as_account(self.user, groups="--clear-groups"),
            sys.executable,
            "-I",
            "-m",
            "paitient.services.relay",
            *(o for o in options if o.split("=", 1)[0] not in given),
            *extra,
        ]

    @contextlib.contextmanager
    def relay(self, *extra: str, own_pids: bool = False) -> Iterator[subprocess.Popen]:
        """The relay as the pod's user; ``own_pids``: in a pid namespace of its own, as the kernels container
        has (the test's processes are then in another, as the server's container is)."""
        with account_process(
            self.relay_argv(*extra, own_pids=own_pids),
            self.tmp / "relay.log",
            lambda: self.sock("airlock").exists(),
            in_namespace=own_pids,
        ) as proc:
            yield proc


def make_authority(folder: Path, name: str, *, sign_for: str | None = None) -> tuple[Path, Path, Path]:
    """A certificate authority ``name`` and a gateway certificate it signed for ``sign_for`` (an IP address
    or a DNS name): (authority's certificate, gateway's certificate, gateway's key), PEM files in ``folder``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(mode=0o755, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    target = sign_for or "127.0.0.1"
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(target))
    except ValueError:
        alt = x509.DNSName(target)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, target)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.crt", folder / "gateway.crt", folder / "gateway.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    for path in paths:
        os.chmod(path, 0o644)
    os.chmod(paths[2], 0o400)
    return paths


def connect(pod: Pod, timeout: float = 60) -> socket.socket:
    """A TLS connection to the gateway trusting the pod's authority, as a relay (or anyone on the pod network
    who has the authority's certificate, which is public) opens it."""
    from paitient.services.kit.tls import client_context

    raw = socket.create_connection(("127.0.0.1", pod.gateway_port), timeout=timeout)
    return client_context(str(pod.authority)).wrap_socket(raw, server_hostname="127.0.0.1")


def gateway_call(pod: Pod, header: dict[str, Any], body: bytes = b"") -> dict[str, Any]:
    """One call straight to the gateway, as a relay (or anyone on the pod network) sends it."""
    with connect(pod) as s:
        s.sendall(json.dumps(header).encode() + b"\n" + body)
        return json.loads(s.makefile("rb").readline())


@pytest.fixture
def pod(world_tmp, make_system_user, monkeypatch) -> Iterator[Pod]:
    user = make_system_user("pod")
    other = make_system_user("other")
    gateway = make_system_user("gateway")
    state = world_tmp / "state"
    state.mkdir(mode=0o755)
    site_file = state / "site.toml"
    site_file.write_text(SITE.format(state=state, gateway_uid=gateway.pw_uid))
    site = load(site_file)
    registry = Registry.for_state_dir(state)
    rootmember.put(registry, Member("alice", user.pw_name, user.pw_uid, ("oncology",), ("researcher",)))
    rootmember.put(registry, Member("bob", other.pw_name, other.pw_uid, ("cardio",), ("researcher",)))
    token, identity = podtokens.mint(podtokens.token_file(state), "alice", user.pw_uid, group=gateway.pw_gid)
    # the pod's token as the kernels container mounts it: a file of the pod's user, in no folder a sandbox binds
    token_dir = world_tmp / "pod-token"
    token_dir.mkdir(mode=0o700)
    (token_dir / "token").write_text(token)
    os.chmod(token_dir / "token", 0o400)
    for p in (token_dir, token_dir / "token"):
        os.chown(p, user.pw_uid, user.pw_gid)
    sockets = world_tmp / "sockets"
    sockets.mkdir(mode=0o755)
    os.chown(sockets, user.pw_uid, user.pw_gid)
    (world_tmp / "data").mkdir(mode=0o755)
    port = free_port()
    authority, cert, key = make_authority(world_tmp / "tls", "paitient test authority")
    os.chown(key, gateway.pw_uid, gateway.pw_gid)
    for name in ("JUPYTERHUB_SERVICE_URL", "JUPYTERHUB_API_TOKEN"):  # the services without their pages
        monkeypatch.setenv(name, "")
    with contextlib.ExitStack() as stack:
        for name in ("audit", "ledger", "airlock"):
            stack.enter_context(
                service_process(
                    name, site.run_dir / f"{name}.sock", f"--site={site_file}", log_path=state / f"{name}.log"
                )
            )
        gateway_log = world_tmp / "gateway.log"
        stack.enter_context(
            account_process(
                [
                    *as_account(gateway),
                    sys.executable,
                    "-I",
                    "-m",
                    "paitient.services.gateway",
                    f"--site={site_file}",
                    "--ip=127.0.0.1",
                    f"--port={port}",
                    "--stream-check=0.3",  # an egress stream learns of its revoked token within 0.3 s
                    f"--tls-cert={cert}",
                    f"--tls-key={key}",
                ],
                gateway_log,
                lambda: gateway_log.exists() and b"listening on" in gateway_log.read_bytes(),
            )
        )
        yield Pod(site, user, other, gateway, identity, token, token_dir / "token", port, sockets, world_tmp, authority)
