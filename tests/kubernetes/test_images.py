"""The Kubernetes profile's images, as ``kernels/image/Containerfile`` builds them, and a user's pod run from them.

``bash scripts/setup test`` builds the images (``python -m paitient.ops.images``: a Debian base made from the
host's apt sources, no registry) into a podman storage of their own; these tests ask no network. An image older
than the tree fails them, with the command that rebuilds it.

No cluster runs here. The pod KubeSpawner renders for a user runs on podman (:class:`Pod`: each container's
security context mapped onto podman's options as a Kubernetes runtime applies it; podman 4.3's ``kube play``
would ignore ``procMount`` and the seccomp profile); the kernels container then starts a real kernel in
bubblewrap under the container's own security context, and a cell runs in it.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import paitient
from paitient.hub.engine import Engine
from paitient.hub.kubernetes import KERNELS_CONTAINER
from paitient.ops.images import TARGETS, Builder, image_tag, suite_storage
from tests.kubernetes.conftest import containers
from tests.kubernetes.test_pod import GIDS, profile
from tests.kubernetes.test_server_config import init_container, run_init, standing_in
from tests.relay.conftest import make_authority

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
UID = 20001  # uid_min + the hub's id of the first user
DATA = "id,size\n1,2.5\n2,3.1\n"
IMAGE_VENV = "/opt/paitient/venv"  # where the Containerfile puts the environment


@pytest.fixture(scope="module")
def builder() -> Builder:
    """podman on the storage the images were built into; fails (never skips) when they are missing or stale."""
    if shutil.which("podman") is None or shutil.which("catatonit") is None:
        pytest.fail("podman and catatonit are needed to run the images; run: bash scripts/setup test", pytrace=False)
    b = Builder(Engine(suite_storage()))
    for target in TARGETS:
        if not b.built_from(target, REPO):
            pytest.fail(
                f"{image_tag(target)} in {suite_storage()} is missing or was built from another tree; build it: "
                f"python -m paitient.ops.images --podman-root {suite_storage()} --wheels {suite_storage() / 'wheels'} "
                "(bash scripts/setup test does)",
                pytrace=False,
            )
    return b


def podman(b: Builder, *args: str, timeout: float = 120, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    r = subprocess.run(b.command(*args), env=b.env, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if check:
        assert r.returncode == 0, f"podman {' '.join(args[:3])}: {r.stderr[-1500:]}"
    return r


def run_in(b: Builder, image: str, *argv: str, user: str = f"{UID}:{UID}") -> str:
    """``argv`` in a throwaway container of ``image`` with a pod's context: the user's uid, no capability, no
    privilege escalation, a read-only root, no network."""
    r = podman(b, "run", "--rm", "--network=none", "--read-only", "--cap-drop=ALL",
               "--security-opt=no-new-privileges", f"--user={user}", "--entrypoint", argv[0], image,
               *argv[1:])  # fmt: skip
    return r.stdout


# -- the images -----------------------------------------------------------------------------------


def test_the_singleuser_image_holds_the_package_of_this_tree_and_starts_as_nobody(builder):
    tag = image_tag("singleuser")
    config = json.loads(podman(builder, "image", "inspect", tag).stdout)[0]["Config"]
    assert config["User"] == "65534:65534" and config["Entrypoint"] == ["tini", "--"]
    assert config["WorkingDir"] == "/home/researcher"
    # what the build was given (the wheels' folder, the CA bundle) is not in the image's settings
    assert not [e for e in config["Env"] if e.startswith(("PIP_CERT", "PIP_FIND_LINKS"))], config["Env"]
    probe = textwrap.dedent("""
        import json, os, shutil, paitient, torch
        kernel = "/opt/paitient/venv/share/jupyter/kernels/python3/kernel.json"
        print(json.dumps({
            "version": paitient.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
            "bwrap": shutil.which("bwrap"), "tini": shutil.which("tini"), "kernel": json.load(open(kernel))["argv"],
            "home": os.path.isdir("/home/researcher"), "wheels": os.listdir("/tmp/build-wheels"),
            "uid": os.getuid(),
        }))
    """)
    seen = json.loads(run_in(builder, tag, "python", "-I", "-c", probe))
    assert seen["version"] == paitient.__version__
    assert seen["torch"].startswith("2.13.0") and seen["cuda"] is None  # the CPU build, not an accelerator's
    assert seen["bwrap"] == "/usr/bin/bwrap" and seen["tini"] == "/usr/bin/tini"
    assert seen["kernel"][0] == f"{IMAGE_VENV}/bin/python" and seen["home"]
    assert seen["wheels"] == [] and seen["uid"] == UID  # the build's mount point is left empty


def test_the_services_image_has_the_workers_accounts_and_the_gateways_group(builder):
    out = run_in(builder, image_tag("services"), "getent", "group", "paitient-users", user="0:0")
    assert out.split(":")[2] == "60090"
    for account in ("paitient-audit", "paitient-jobs"):
        entry = run_in(builder, image_tag("services"), "getent", "passwd", account, user="0:0").strip().split(":")
        assert entry[5] == "/nonexistent" and entry[6] == "/usr/sbin/nologin"
        assert 0 < int(entry[2]) < 1000  # a system account


# -- a user's pod ---------------------------------------------------------------------------------

SECCOMP = {"RuntimeDefault": [], "Unconfined": ["--security-opt=seccomp=unconfined"]}
APPARMOR = {"RuntimeDefault": [], "Unconfined": ["--security-opt=apparmor=unconfined"]}
PROC_MOUNT = {"Default": [], "Unmasked": ["--security-opt=unmask=ALL"]}


def context_args(pod_context: dict[str, Any], ctx: dict[str, Any]) -> list[str]:
    """A container's security context as podman's options, as a Kubernetes runtime applies it. Every field
    the profile sets is mapped; any other fails the test, so nothing of the manifest is silently dropped."""
    known = {"runAsNonRoot", "runAsUser", "runAsGroup", "allowPrivilegeEscalation", "privileged", "capabilities",
             "readOnlyRootFilesystem", "seccompProfile", "appArmorProfile", "procMount"}  # fmt: skip
    assert set(ctx) <= known, f"a security context field this test does not map: {set(ctx) - known}"
    merged = {**pod_context, **ctx}
    uid, gid = merged["runAsUser"], merged["runAsGroup"]
    assert not (merged["runAsNonRoot"] and uid == 0)
    # the runtime adds the pod's fsGroup to every container's groups, beside its supplementalGroups
    fs_group = [merged["fsGroup"]] if merged.get("fsGroup") is not None else []
    groups = [*fs_group, *(merged.get("supplementalGroups") or [])]
    args = [f"--user={uid}:{gid}", *(f"--group-add={g}" for g in groups)]
    assert merged["privileged"] is False
    args += [f"--cap-drop={c}" for c in merged["capabilities"].get("drop") or []]
    args += [f"--cap-add={c}" for c in merged["capabilities"].get("add") or []]
    if merged["allowPrivilegeEscalation"] is False:
        args.append("--security-opt=no-new-privileges")
    if merged["readOnlyRootFilesystem"]:
        args += ["--read-only", "--read-only-tmpfs=false"]
    args += SECCOMP[merged["seccompProfile"]["type"]]
    args += APPARMOR[merged.get("appArmorProfile", {"type": "RuntimeDefault"})["type"]]
    args += PROC_MOUNT[merged.get("procMount", "Default")]
    return args


@dataclass
class Pod:
    """The rendered pod run by podman: a pod (one network namespace, ``none``: only a loopback; no shared
    pid namespace, as the manifest has it), its volumes, its init containers to completion, then its
    containers. The volumes: claims and empty folders are podman volumes of the pod's own, the Secret and the
    ConfigMap folders written by the test. Left out:

    - the ``notebook`` container: its server needs the hub's API, and no hub runs here (the init container
      that writes its configuration runs);
    - ``hostUsers: false``: a user namespace for the pod needs subordinate id ranges, and the claims' groups
      would not map into it without idmapped mounts (not tried here).
    """

    builder: Builder
    manifest: dict[str, Any]
    folder: Path
    files: dict[str, dict[str, str]]
    """The Secret's and the ConfigMap's files, by volume name."""
    owners: dict[str, tuple[int, int, int]]
    """Each claim's root folder: uid, gid and mode, as the volume's provisioner left it."""

    def __post_init__(self) -> None:
        self.name = f"{self.manifest['metadata']['name']}-{secrets.token_hex(3)}"
        self.volumes: dict[str, str] = {}  # volume name -> podman's -v source
        self.made: list[str] = []

    def volume(self, name: str) -> Path:
        return volume_path(self.builder, self.volumes[name])

    def setup(self) -> None:
        podman(self.builder, "pod", "create", f"--name={self.name}", "--network=none", "--share=net,ipc,uts")
        # without an fsGroup (the hub's pod), what the runtime makes stays root's group
        fs_group = self.manifest["spec"]["securityContext"].get("fsGroup") or 0
        for v in self.manifest["spec"]["volumes"]:
            name = v["name"]
            if "persistentVolumeClaim" in v or "emptyDir" in v:
                # an empty folder is the runtime's: root's and the fsGroup's, writable by all (0777)
                uid, gid, mode = self.owners[name] if "persistentVolumeClaim" in v else (0, fs_group, 0o777)
                source = f"{self.name}-{name}"
                # the owner given when it is made: podman would otherwise give a volume, at its first mount,
                # the owner of the image's folder at that path
                podman(self.builder, "volume", "create", f"--opt=o=uid={uid},gid={gid}", source)
                self.made.append(source)
                volume_path(self.builder, source).chmod(mode)
            else:
                kind = "secret" if "secret" in v else "configMap"
                assert kind in v, f"a volume this test does not map: {v}"
                folder = self.folder / name
                folder.mkdir()
                for key, text in self.files[name].items():
                    (folder / key).write_text(text)
                    (folder / key).chmod(v[kind].get("defaultMode", 0o644))  # Kubernetes' default
                    # a runtime gives a Secret's and a ConfigMap's files to root and the pod's fsGroup
                    shutil.chown(folder / key, 0, fs_group)
                source = str(folder)
            self.volumes[name] = source

    def run(self, container: dict[str, Any], *, detach: bool) -> str:
        spec = self.manifest["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
        args = [f"--pod={self.name}", f"--name={self.name}-{container['name']}", "--pull=never"]
        args += context_args(spec["securityContext"], container["securityContext"])
        args += [f"--env={e['name']}={e['value']}" for e in container.get("env") or []]
        for m in container.get("volumeMounts") or []:
            source = self.volumes[m["name"]]
            if m.get("subPath"):  # one key of a Secret or a ConfigMap, as a file
                assert source.startswith("/"), f"a subPath of a volume this test does not map: {m}"
                source = f"{source}/{m['subPath']}"
            # nocopy: a runtime does not fill a claim or an empty folder with the image's files under its path
            options = [] if source.startswith("/") else ["nocopy"]
            if m.get("readOnly") or claims.get(m["name"], {}).get("readOnly"):
                options.append("ro")
            args.append(f"--volume={source}:{m['mountPath']}" + (f":{','.join(options)}" if options else ""))
        if container.get("workingDir"):
            args.append(f"--workdir={container['workingDir']}")
        if container.get("command"):  # a command replaces the image's entrypoint (tini)
            args.append(f"--entrypoint={json.dumps(container['command'])}")
        argv = [container["image"], *(container.get("args") or [])]
        if detach:
            return podman(self.builder, "run", "--detach", *args, *argv).stdout
        return podman(self.builder, "run", "--rm", *args, *argv, timeout=120).stdout

    def remove(self) -> None:
        podman(self.builder, "pod", "rm", "--force", "--time=5", self.name, check=False, timeout=120)
        for source in self.made:
            podman(self.builder, "volume", "rm", "--force", source, check=False)


def volume_path(b: Builder, name: str) -> Path:
    return Path(podman(b, "volume", "inspect", "--format", "{{.Mountpoint}}", name).stdout.strip())


def tree(root: Path) -> dict[str, bytes | str]:
    """Every file's contents and every link's target under ``root``, by relative path."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = str(path.readlink())
        elif path.is_file():
            found[rel] = path.read_bytes()
    return found


def publish(data: Path) -> None:
    """A published dataset in the project's claim, its folders open to the project's group only."""
    version = data / "breast_cancer" / "versions" / "1"
    version.mkdir(parents=True)
    (version / "data.csv").write_text(DATA)
    (data / "breast_cancer" / "current").symlink_to("versions/1")
    for d in (data / "breast_cancer", data / "breast_cancer" / "versions", version):
        shutil.chown(d, 0, GIDS["oncology"])
        d.chmod(0o750)
    shutil.chown(version / "data.csv", 0, GIDS["oncology"])
    (version / "data.csv").chmod(0o666)  # anyone could write it, but for the read-only claim


CLIENT = """
import json, os, sys
from pathlib import Path
from jupyter_client import BlockingKernelClient
from paitient import channel
from paitient.rules.sandbox import user_runtime_dir

home = Path("/home/researcher")
runtime = Path(user_runtime_dir(str(home)))
for d in (home / ".local", home / ".local/share", home / ".local/share/jupyter", runtime, runtime / "kpod"):
    d.mkdir(mode=0o700, exist_ok=True)
conn = runtime / "kernel-pod.json"
conn.write_text(json.dumps({"transport": "ipc", "ip": str(runtime / "kpod" / "k"), "shell_port": 1,
    "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5, "key": "0" * 32,
    "signature_scheme": "hmac-sha256", "kernel_name": "python3"}))
conn.chmod(0o600)
try:
    open("/var/tmp/written", "w")  # the image's folder open to all (1777)
    image = "WROTE"
except OSError as e:
    image = e.errno
started = channel.call("/run/paitient/launcher.sock", "start",
                       {"connection_file": str(conn), "kernel": "python3", "cwd": str(home)}, timeout=90)
client = BlockingKernelClient()
client.load_connection_file(str(conn))
client.start_channels()
client.wait_for_ready(timeout=90)
out = []
reply = client.execute_interactive(sys.stdin.read(), timeout=90, output_hook=out.append)
client.stop_channels()
print(json.dumps({"started": started, "status": reply["content"]["status"],
                  "stdout": "".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream"),
                  "errors": [m["content"] for m in out if m["msg_type"] == "error"],
                  "client_net": os.readlink("/proc/self/ns/net"), "client_pid": os.readlink("/proc/self/ns/pid"),
                  "image": image}))
"""

CELL = """
import json, os, socket
path = "/data/oncology/breast_cancer/data.csv"  # the current version, which the launcher binds
try:
    open(path, "a").write("x")
    wrote = "WROTE"
except OSError as e:
    wrote = e.errno
print(json.dumps({
    "uid": os.getuid(), "groups": sorted(os.getgroups()), "rows": open(path).read(), "wrote": wrote,
    "data": sorted(os.listdir("/data")), "net": os.readlink("/proc/self/ns/net"),
    "pid_ns": os.readlink("/proc/self/ns/pid"), "interfaces": [n for _, n in socket.if_nameindex()],
    "token": os.path.exists("/run/paitient-token"), "cwd": os.getcwd(),
}))
"""


async def test_the_rendered_pod_runs_a_cell_in_bubblewrap_in_its_kernels_container(
    builder, site, make_user, render, tmp_path
):
    alice = make_user("alice", ("oncology",))
    rendered = await render(alice, profile(site, image=image_tag("singleuser")))
    assert rendered["spec"]["securityContext"]["runAsUser"] == UID
    ca, _, _ = make_authority(tmp_path / "ca", "paitient test gateway authority")
    files = {"pod-token": {"token": secrets.token_hex(16)}, "gateway-ca": {"ca.crt": ca.read_text()}}
    # the home: the user's (the pod's fsGroup on a cluster); the project's data: root's, its group's to read
    owners = {"home": (UID, UID, 0o750), "data-oncology": (0, GIDS["oncology"], 0o750)}
    pod = Pod(builder, rendered, tmp_path, files, owners)
    try:
        pod.setup()
        publish(pod.volume("data-oncology"))

        # the init container, as the user, writes the server's configuration into its volume: the same files
        # as its command run here
        (init,) = rendered["spec"]["initContainers"]
        pod.run(init, detach=False)
        written = pod.volume("server-config")
        args, expected, _ = standing_in(init_container(rendered)["args"], tmp_path)
        assert run_init(args).returncode == 0
        # the kernel spec names the environment's python: the image's where this one's is
        here = {k: v.replace(sys.prefix.encode(), IMAGE_VENV.encode()) if isinstance(v, bytes) else v
                for k, v in tree(expected).items()}  # fmt: skip
        assert tree(written) == here and (written / "config" / "jupyter_server_config.json").is_file()
        assert {f.stat().st_uid for f in written.rglob("*")} == {UID}  # written as the user

        pod.run(containers(rendered)[KERNELS_CONTAINER], detach=True)
        kernels = f"{pod.name}-{KERNELS_CONTAINER}"
        host = json.loads(podman(builder, "container", "inspect", kernels).stdout)[0]
        assert host["Config"]["User"] == f"{UID}:{UID}" and host["HostConfig"]["ReadonlyRootfs"] is True
        assert host["HostConfig"]["GroupAdd"] == [str(UID), str(GIDS["oncology"])]  # fsGroup, the project's
        assert not host["HostConfig"]["CapAdd"]
        deadline = time.monotonic() + 60
        while podman(builder, "exec", kernels, "test", "-S", "/run/paitient/launcher.sock", check=False).returncode:
            assert time.monotonic() < deadline, podman(builder, "logs", kernels, check=False).stderr[-1500:]
            time.sleep(0.5)
        # the container's own process: no capability in any set, no privilege to gain
        status = podman(builder, "exec", kernels, "cat", "/proc/1/status").stdout
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        assert all(int(fields[k], 16) == 0 for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")), fields
        assert fields["NoNewPrivs"].strip() == "1"

        r = podman(builder, "exec", "-i", kernels, "python", "-I", "-c", textwrap.dedent(CLIENT),
                   input=textwrap.dedent(CELL), timeout=240)  # fmt: skip
        answer = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        pod.remove()
    assert answer["status"] == "ok", answer["errors"]
    assert answer["started"]["datasets"] == ["oncology/breast_cancer"]
    seen = json.loads(answer["stdout"])
    # the project's group is kept and opens the data's folders; bubblewrap's user namespace maps the kernel's
    # own gid only, so the kernel sees it as the overflow gid
    assert seen["uid"] == UID and seen["groups"] == [UID, 65534]
    assert seen["rows"] == DATA and seen["data"] == ["oncology"]
    assert seen["wrote"] == 30  # EROFS: the claim is mounted read-only, whatever the file's mode
    assert answer["image"] == 30  # the container's root is read-only where a folder lets anyone write
    # bubblewrap inside the container: a network and a pid namespace of the kernel's own, only a loopback
    assert seen["net"] != answer["client_net"] and seen["pid_ns"] != answer["client_pid"]
    assert seen["interfaces"] == ["lo"]
    assert seen["token"] is False  # the pod's token stays outside the sandbox
    assert seen["cwd"] == "/home/researcher"
