"""The pod's kernel launcher, run for real as a pod would run it: as a non-root account, its socket in a folder
of its own, a "/data/<project>" tree standing for the project volumes the hub mounted. It starts real kernels
in bubblewrap for its own uid, and refuses every other uid and every request that asks for more."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from paitient.rules.sandbox import user_runtime_dir
from paitient.services.launcher.pod import MODULE
from tests.launcher.asking import ASK, ask_as, connection_file, sandbox_of

CELL = """
import json, os
try:
    open("/data/onc/bc/data.csv", "a").write("x")
    wrote = "WROTE"
except OSError as e:
    wrote = e.errno
print(json.dumps({
    "uid": os.getuid(),
    "data": sorted(os.listdir("/data")),
    "onc": sorted(os.listdir("/data/onc")),
    "rows": open("/data/onc/bc/data.csv").read(),
    "wrote": wrote,
    "cwd": os.getcwd(),
    "sockets": sorted(os.listdir(SOCKETS)),
    "env": sorted(os.environ),
    "tmp": [os.statvfs(p).f_blocks * os.statvfs(p).f_frsize for p in ("/tmp", "/dev/shm")],
}))
"""

POD_TMP_BYTES = 5 << 20
"""The size of /tmp and /dev/shm the pod fixture's launcher is given (``--tmp-bytes``, from the site)."""

RUN_CELL = (
    ASK
    + """
sys.stdout.flush()
ask = json.loads(sys.stdin.readline())
from jupyter_client import BlockingKernelClient
client = BlockingKernelClient()
client.load_connection_file(ask["connection_file"])
client.start_channels()
client.wait_for_ready(timeout=60)
out = []
reply = client.execute_interactive(ask["code"], timeout=60, output_hook=out.append)
client.stop_channels()
text = "".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")
print(json.dumps({"status": reply["content"]["status"], "stdout": text}))
sys.stdout.flush()
sys.stdin.read()
"""
)


def line_of(proc: subprocess.Popen, timeout: float = 120.0) -> dict:
    """The next JSON line ``proc`` prints, failing (not hanging) when none comes within ``timeout``."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no answer within {timeout} s"
    return json.loads(proc.stdout.readline())


def as_account(pw) -> list[str]:
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]


PID_NAMESPACE = ["unshare", "--pid", "--fork", "--mount-proc"]
"""A pid namespace of its own, as a container has: the launcher is its pid 1 (``unshare`` waits outside it),
and when the launcher ends, every process in the namespace ends with it."""


@dataclass
class PodLauncher:
    """The launcher's process: ``proc`` the one started (``unshare`` when in a pid namespace of its own), ``pid``
    the launcher itself, as this machine numbers it."""

    proc: subprocess.Popen
    pid: int

    def end(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        """Signal the launcher and wait for it (and ``unshare``), SIGKILL after ``timeout``."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(timeout=10)


def _child(pid: int, timeout: float = 30.0) -> int:
    """The one child of ``pid`` (what ``unshare --fork`` started), once it has one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} started no child")


@contextlib.contextmanager
def pod_launcher(pw, sockets: Path, data: Path, *extra: str, own_pids: bool = False) -> Iterator[PodLauncher]:
    """``python -m paitient.services.launcher.pod`` as ``pw`` (as the kernels container runs it), yielded once
    its socket exists; ended by its pid (SIGTERM, then SIGKILL). ``own_pids``: in a pid namespace of its own
    (:data:`PID_NAMESPACE`), as in a pod, where the server's container has another."""
    log = open(sockets.parent / f"launcher-{pw.pw_name}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            *(PID_NAMESPACE if own_pids else []),
            *as_account(pw),
            sys.executable,
            "-I",
            "-m",
            MODULE,
            f"--socket={sockets / 'launcher.sock'}",
            f"--home={pw.pw_dir}",
            f"--data-root={data}",
            f"--run-dir={sockets / 'services'}",
            *extra,
        ],
        stdout=log,
        stderr=log,
        env={"PATH": "/usr/bin:/bin"},
    )
    launcher = PodLauncher(proc, proc.pid)
    try:
        if own_pids:
            launcher.pid = _child(proc.pid)  # (setpriv ran in it and became the launcher)
        deadline = time.monotonic() + 60
        while not (sockets / "launcher.sock").exists():
            assert proc.poll() is None, (sockets.parent / f"launcher-{pw.pw_name}.log").read_text()
            assert time.monotonic() < deadline, "the pod launcher never made its socket"
            time.sleep(0.05)
        yield launcher
    finally:
        launcher.end()
        log.close()


def dataset(root: Path, project: str, name: str, text: str) -> None:
    """A published dataset as a project volume holds it: ``<name>/versions/1`` and ``current`` -> it."""
    version = root / project / name / "versions" / "1"
    version.mkdir(parents=True)
    (version / "data.csv").write_text(text)
    (root / project / name / "current").symlink_to("versions/1")
    for d in (root, root / project, root / project / name, root / project / name / "versions", version):
        os.chmod(d, 0o755)
    os.chmod(version / "data.csv", 0o666)  # writable by anyone but for the read-only mount


@pytest.fixture
def pod(world_tmp, make_system_user):
    """A pod's user and an unrelated account; the pod's mounts: ``onc`` only. Beside it, ``card``'s data (another
    user's project) is reachable by a link under the data root and by a folder with an invalid name."""
    user, other = make_system_user("pod", member=False), make_system_user("other", member=False)
    data = world_tmp / "data"
    dataset(data, "onc", "bc", "id,size\n1,2.5\n")
    dataset(world_tmp / "elsewhere", "card", "dia", "id,glucose\nCARD-SECRET,7.1\n")
    (data / "card").symlink_to(world_tmp / "elsewhere" / "card")
    (data / "Not A Project").mkdir()
    sockets = world_tmp / "sockets"
    sockets.mkdir(mode=0o755)
    os.chown(sockets, user.pw_uid, user.pw_gid)
    with pod_launcher(user, sockets, data, f"--tmp-bytes={POD_TMP_BYTES}") as launcher:
        yield user, other, sockets / "launcher.sock", launcher


def test_a_kernel_for_the_pods_own_uid_runs_a_cell_with_only_the_mounted_data(pod):
    user, _, sock, launcher = pod
    conn = connection_file(user)
    work = Path(user.pw_dir) / "study"
    work.mkdir()
    os.chown(work, user.pw_uid, user.pw_gid)
    client = subprocess.Popen(
        [
            *as_account(user),
            sys.executable,
            "-c",
            textwrap.dedent(RUN_CELL),
            str(sock),
            json.dumps({"connection_file": str(conn), "kernel": "python3", "cwd": str(work)}),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    try:
        answer = line_of(client)
        assert "ok" in answer, answer
        assert answer["ok"]["datasets"] == ["onc/bc"]
        code = CELL.replace("SOCKETS", repr(str(sock.parent)))
        client.stdin.write(json.dumps({"connection_file": str(conn), "code": code}) + "\n")
        client.stdin.flush()
        cell = line_of(client)
        assert cell["status"] == "ok", cell
        seen = json.loads(cell["stdout"])
        assert seen["uid"] == user.pw_uid
        assert seen["data"] == ["onc"] and seen["onc"] == ["bc"]  # not the linked project, not the odd folder
        assert seen["rows"] == "id,size\n1,2.5\n"
        assert seen["wrote"] == 30  # EROFS: the file is writable to all, the mount read-only
        assert seen["cwd"] == str(work)
        # the launcher's socket is not in the sandbox (no kernel asks for kernels): only the services' folder is
        assert seen["sockets"] == ["services"]
        assert "JUPYTERHUB_API_TOKEN" not in seen["env"] and "LD_PRELOAD" not in seen["env"]
        assert seen["tmp"] == [POD_TMP_BYTES, POD_TMP_BYTES]  # the size the hub gave the launcher, not 1 GiB

        # the process tree, from outside: the launcher (as the user) -> keeper -> bubblewrap, no setpriv
        pid = answer["ok"]["pid"]
        keeper = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
        assert keeper[1:3] == ["-I", "-S"] and keeper[3].endswith("keeper.py") and "setpriv" not in keeper
        assert int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == launcher.pid
        _, argv = sandbox_of(pid)
        dests = [argv[i + 2] for i, a in enumerate(argv) if a in ("--bind", "--ro-bind", "--ro-bind-try")]
        assert [d for d in dests if d.startswith("/data")] == ["/data/onc/bc"]
        assert "--seccomp" in argv and argv[argv.index("--cap-drop") + 1] == "ALL"
        assert str(sock.parent / "services") in dests and str(sock.parent) not in dests
    finally:
        client.stdin.close()
        client.wait(timeout=30)
    # the client (the server) is gone: its keeper ended the kernel
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists()


def test_another_uid_is_refused_by_its_peer_credentials(pod):
    user, other, sock, _ = pod
    args = {"connection_file": str(connection_file(other)), "kernel": "python3"}
    # the socket is the pod user's, 0600: another account cannot even connect
    assert (sock.stat().st_mode & 0o777, sock.stat().st_uid) == (0o600, user.pw_uid)
    answer = ask_as(other, sock, args, groups="--clear-groups")
    assert answer["code"] == "unavailable", answer
    # and were the file open to all, the peer credentials still refuse it, before the request is read
    os.chmod(sock, 0o666)
    answer = ask_as(other, sock, args, groups="--clear-groups")
    assert answer["code"] == "forbidden", answer
    assert f"uid {other.pw_uid} is not this pod's uid {user.pw_uid}" in answer["error"]
    answer = ask_as(None, sock, args)
    assert answer["code"] == "forbidden" and f"uid 0 is not this pod's uid {user.pw_uid}" in answer["error"], answer


@pytest.mark.parametrize(
    ("extra", "code", "says"),
    [
        ({"mounts": [["/", "/host"]]}, "field_refused", "refused: mounts"),
        ({"data": {"card": ["dia"]}}, "field_refused", "refused: data"),
        ({"env": {"LD_PRELOAD": "/tmp/x.so"}}, "field_refused", "refused: env"),
        ({"capabilities": ["CAP_SYS_ADMIN"]}, "field_refused", "refused: capabilities"),
        ({"argv": ["/bin/sh"]}, "field_refused", "refused: argv"),
        ({"cwd": "/etc"}, "path_refused", "cwd must be a folder in your home"),
        ({"cwd": "{home}/../.."}, "path_refused", "cwd must be a folder in your home"),
        ({"connection_file": "/etc/passwd"}, "path_refused", "the connection file must be"),
        ({"connection_file": "{home}/kernel-abc123.json"}, "path_refused", "the connection file must be"),
        ({"connection_file": "{runtime}/../runtime/kernel-abc123.json"}, "path_refused", "the connection file must"),
        ({"connection_file": "{runtime}/kernel-link.json"}, "path_refused", "cannot open the connection file"),
        ({"connection_file": "{runtime}/kernel-out.json"}, "path_refused", "must lie in a folder of their own"),
        ({"kernel": "bash"}, "unknown_kernel", "no kernel 'bash'"),
    ],
)
def test_a_crafted_request_is_refused(pod, extra, code, says):
    user, _, sock, _ = pod
    runtime = user_runtime_dir(user.pw_dir)
    args = {"connection_file": str(connection_file(user)), "kernel": "python3"}
    connection_file(user, "kernel-out.json", ip="/tmp/k")  # its sockets would lie outside the runtime dir
    link = Path(runtime) / "kernel-link.json"
    link.symlink_to("/etc/passwd")
    os.lchown(link, user.pw_uid, user.pw_gid)
    for key, value in extra.items():
        args[key] = value.format(home=user.pw_dir, runtime=runtime) if isinstance(value, str) else value
    answer = ask_as(user, sock, args, groups="--clear-groups")
    assert answer.get("code") == code and says in answer["error"], answer


def test_the_launcher_refuses_a_socket_that_a_sandbox_binds_and_to_run_as_root(world_tmp, make_system_user):
    user = make_system_user("pod", member=False)
    data = world_tmp / "data"
    data.mkdir(mode=0o755)
    common = [sys.executable, "-I", "-m", MODULE, f"--home={user.pw_dir}", f"--data-root={data}"]
    for socket, folder in ((f"{user.pw_dir}/launcher.sock", "home"), (f"{data}/launcher.sock", "data root")):
        r = subprocess.run(
            [*as_account(user), *common, f"--socket={socket}", f"--run-dir={world_tmp}/services"],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin"},
        )
        assert r.returncode == 2 and f"lies in the {folder}" in r.stderr, r.stderr
        assert not Path(socket).exists()
    r = subprocess.run(
        [*common, f"--socket={world_tmp}/root.sock"], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert r.returncode == 2 and "refusing to run as root" in r.stderr, r.stderr


SERVER = """
import json, os, sys, time, uuid
from traitlets.config import Config
from jupyter_client.manager import KernelManager
from jupyter_core.paths import jupyter_runtime_dir as runtime_dir

config = Config()
config.SandboxProvisioner.launcher_socket = sys.argv[1]


def started():
    # as the server's kernel manager names it: kernel-<id>.json in the runtime dir
    name = f"kernel-{uuid.uuid4()}.json"
    km = KernelManager(kernel_name="python3", config=config, connection_file=os.path.join(runtime_dir(), name))
    km.start_kernel()
    client = km.blocking_client()
    client.start_channels()
    client.wait_for_ready(timeout=60)
    return km, client


km, client = started()
seen = {"process": type(km.provisioner.process).__name__, "pid": km.provisioner.pid, "alive": km.is_alive()}
out = []
reply = client.execute_interactive("import os; print(os.getuid())", timeout=60, output_hook=out.append)
seen["cell"] = [reply["content"]["status"], "".join(m["content"].get("text", "") for m in out)]
client.stop_channels()
km.shutdown_kernel(now=True)
seen["alive after shutdown"] = km.is_alive()

km, client = started()  # a kernel that ends by itself: the server learns it from the launcher
client.execute("import os; os._exit(3)")
deadline = time.monotonic() + 30
while km.is_alive() and time.monotonic() < deadline:
    time.sleep(0.1)
seen["alive after exit"] = km.is_alive()
client.stop_channels()
km.cleanup_resources()
print(json.dumps(seen), flush=True)

km, client = started()  # a kernel whose launcher goes: the server counts it ended
print(json.dumps({"alive": km.is_alive()}), flush=True)
sys.stdin.readline()  # the launcher has been ended
deadline = time.monotonic() + 30
while km.is_alive() and time.monotonic() < deadline:
    time.sleep(0.1)
client.stop_channels()
print(json.dumps({"alive after the launcher ended": km.is_alive()}), flush=True)
"""


def kernels_of(uid: int) -> list[str]:
    """The keepers and sandboxes of ``uid`` running on this machine, whatever their pid namespace."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or proc.stat().st_uid != uid:
                continue
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith((b"keeper.py", b"bwrap")) for a in argv[:4]):
            found.append(b" ".join(argv).decode(errors="replace"))
    return found


def test_a_server_that_cannot_see_the_launchers_pids_runs_and_ends_its_kernels_through_the_launcher(
    world_tmp, make_system_user
):
    """As in a pod: the launcher in a pid namespace of its own, the server (a real kernel manager with the
    workspace's provisioner) in another. The server cannot see the kernel's pid; it learns that the kernel runs
    or ended, and ends it, by asking the launcher with the kernel's handle."""
    from paitient.hub.serverconfig import kernel_spec

    user = make_system_user("pod", member=False)
    data = world_tmp / "data"
    dataset(data, "onc", "bc", "id,size\n1,2.5\n")
    sockets = world_tmp / "sockets"
    sockets.mkdir(mode=0o755)
    os.chown(sockets, user.pw_uid, user.pw_gid)
    connection_file(user)  # the runtime dir, as the server has it
    jupyter = Path(user.pw_dir) / ".local" / "share" / "jupyter"
    spec = jupyter / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps(kernel_spec(sys.executable)))
    for d in (jupyter / "kernels", spec, spec / "kernel.json"):
        os.chown(d, user.pw_uid, user.pw_gid)
    errors_at = world_tmp / "server.log"
    with pod_launcher(user, sockets, data, own_pids=True) as launcher, open(errors_at, "w") as errors:
        server = subprocess.Popen(
            [*as_account(user), sys.executable, "-c", textwrap.dedent(SERVER), str(sockets / "launcher.sock")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            cwd=user.pw_dir,
            env={
                "PATH": "/usr/bin:/bin",
                "HOME": user.pw_dir,
                "JUPYTER_DATA_DIR": str(jupyter),
                "JUPYTER_RUNTIME_DIR": user_runtime_dir(user.pw_dir),
                "JUPYTER_CONFIG_DIR": str(Path(user.pw_dir) / ".jupyter"),
            },
        )
        try:
            seen = line_of(server, timeout=240)
            # the launcher did not see the server: the kernel is followed by its handle, not by a pid
            assert (seen["process"], seen["pid"], seen["alive"]) == ("HandledKernel", None, True)
            assert seen["cell"] == ["ok", f"{user.pw_uid}\n"]
            assert seen["alive after shutdown"] is False and seen["alive after exit"] is False
            assert line_of(server) == {"alive": True}
            launcher.end(signal.SIGKILL)  # as a container that dies: its pid namespace ends, the kernel with it
            server.stdin.write("\n")
            server.stdin.flush()
            assert line_of(server) == {"alive after the launcher ended": False}
            assert server.wait(timeout=60) == 0
        except AssertionError as e:
            raise AssertionError(f"{e}; the server said: {errors_at.read_text()[-3000:]}") from None
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(timeout=30)
    assert kernels_of(user.pw_uid) == []  # every sandbox is gone, with its keeper
