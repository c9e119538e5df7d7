"""The server's configuration in a user's pod: the init container that writes it, the read-only volume the
server reads it from, and what the init container's own command writes when it is run as the manifest says
(here, as the test process, into a folder standing for the pod's volume)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from traitlets.config.loader import JSONFileConfigLoader

from paitient import config as site_config
from paitient.hub import podconfig
from paitient.hub.kubernetes import CONFIG_CONTAINER, KERNELS_CONTAINER, NOTEBOOK_CONTAINER, notebook_context
from paitient.hub.serverconfig import KERNEL_NAME, kernel_spec
from paitient.services.launcher import pod as launcher
from tests.kubernetes.conftest import containers
from tests.kubernetes.test_pod import profile


def init_container(pod: dict[str, Any]) -> dict[str, Any]:
    (init,) = pod["spec"]["initContainers"]
    assert init["name"] == CONFIG_CONTAINER
    return init


def mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container.get("volumeMounts") or []}


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env") or [] if "value" in e}


def option(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return value


def with_option(args: list[str], name: str, value: str | None) -> list[str]:
    """``args`` with ``--name`` set to ``value`` (None: left out)."""
    kept = [a for a in args if not a.startswith(f"--{name}=")]
    return kept if value is None else [*kept, f"--{name}={value}"]


def run_init(args: list[str]) -> subprocess.CompletedProcess[str]:
    """The init container's command as the manifest gives it, with this environment's python for ``python``
    (the image's entrypoint runs it as given; the image's python is the package's environment)."""
    assert args[0] == "python"
    return subprocess.run(  # noqa: S603 - the manifest's own command
        [sys.executable, *args[1:]], capture_output=True, text=True, timeout=60, env={"PATH": os.environ["PATH"]}
    )


def standing_in(args: list[str], tmp_path: Path) -> tuple[list[str], Path, Path]:
    """The manifest's args, writing into folders of ``tmp_path`` that stand for the pod's two volumes."""
    into, state = tmp_path / "server-config", tmp_path / "server-state"
    into.mkdir()
    state.mkdir()
    return with_option(with_option(args, "into", str(into)), "state", str(state)), into, state


async def test_an_init_container_as_restricted_as_the_server_writes_the_servers_configuration(site, make_user, render):
    alice = make_user("alice", ("oncology",))
    pod = await render(alice, profile(site))
    uid = site.accounts.uid_min + alice.id
    init, by_name = init_container(pod), containers(pod)
    # the same image and uid as the server; the server's restrictions, the runtime's seccomp filter included
    assert init["image"] == by_name[NOTEBOOK_CONTAINER]["image"]
    assert init["securityContext"] == by_name[NOTEBOOK_CONTAINER]["securityContext"] == notebook_context(uid, uid)
    ctx = init["securityContext"]
    assert ctx["runAsUser"] == uid != 0 and ctx["runAsNonRoot"] is True
    assert ctx["allowPrivilegeEscalation"] is False and ctx["privileged"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"} and ctx["readOnlyRootFilesystem"] is True
    # the entrypoint stays (tini); the module is the argument, as for the other two containers
    assert "command" not in init or init["command"] is None
    assert init["args"][:4] == ["python", "-I", "-m", "paitient.hub.podconfig"]
    assert option(init["args"], "into") == podconfig.JUPYTER and option(init["args"], "state") == podconfig.STATE
    assert env_of(init) == {"LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1"}
    # it mounts the two volumes it writes, and nothing else: no home, no data, no sockets
    assert mounts(init) == {
        "server-config": {"name": "server-config", "mountPath": podconfig.JUPYTER},
        "server-state": {"name": "server-state", "mountPath": podconfig.STATE},
    }
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["server-config"]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes["server-state"]
    # the server reads the configuration read-only; the kernels' container has neither volume
    notebook = mounts(by_name[NOTEBOOK_CONTAINER])
    assert notebook["server-config"] == {"name": "server-config", "mountPath": podconfig.JUPYTER, "readOnly": True}
    assert notebook["server-state"]["mountPath"] == podconfig.STATE and not notebook["server-state"].get("readOnly")
    assert not {"server-config", "server-state"} & set(mounts(by_name[KERNELS_CONTAINER]))
    # and is pointed at it: Jupyter's config and data dirs in the volume, the runtime dir in the home
    env = env_of(by_name[NOTEBOOK_CONTAINER])
    assert env["JUPYTER_CONFIG_DIR"] == f"{podconfig.JUPYTER}/config"
    assert env["JUPYTER_DATA_DIR"] == f"{podconfig.JUPYTER}/data"
    assert env["JUPYTER_RUNTIME_DIR"] == "/home/researcher/.local/share/jupyter/runtime"
    assert (env["JUPYTER_PREFER_ENV_PATH"], env["JUPYTER_PLATFORM_DIRS"], env["PYTHONNOUSERSITE"]) == ("0", "0", "1")
    assert "JUPYTER_PATH" not in env and "JUPYTER_CONFIG_PATH" not in env


async def test_the_init_containers_command_writes_what_the_server_reads(
    site_file, make_user, render, tmp_path, monkeypatch
):
    """Run the manifest's command; load what it wrote as Jupyter would, with the notebook container's
    environment (its volume at the folder standing for it)."""
    site_file.write_text(site_file.read_text() + "\n[sandbox]\nmemory_mb = 3072\n")
    site = site_config.load(site_file)
    pod = await render(make_user("alice", ("oncology",)), profile(site))
    args, into, state = standing_in(init_container(pod)["args"], tmp_path)
    done = run_init(args)
    assert done.returncode == 0, done.stderr

    # the server's environment, with the volume's mount point standing in the temporary folder
    for name, value in env_of(containers(pod)[NOTEBOOK_CONTAINER]).items():
        if name.startswith("JUPYTER_") or name == "HOME":
            monkeypatch.setenv(name, value.replace(podconfig.JUPYTER, str(into)))
    from jupyter_core.paths import jupyter_config_path, jupyter_path

    config_dir = Path(os.environ["JUPYTER_CONFIG_DIR"])
    assert jupyter_config_path()[0] == str(config_dir) == str(into / "config")
    # nothing in the home is a place Jupyter reads configuration or kernel specs from
    for path in [*jupyter_config_path(), *jupyter_path()]:
        assert not path.startswith("/home/"), path

    loaded = JSONFileConfigLoader("jupyter_server_config.json", path=str(config_dir)).load_config()
    provisioner = loaded.SandboxProvisioner
    kernels_args = containers(pod)[KERNELS_CONTAINER]["args"]
    assert provisioner.launcher_socket == launcher.SOCKET == option(kernels_args, "socket")
    assert (provisioner.data_root, provisioner.run_dir) == (launcher.DATA, launcher.RUN_DIR)
    assert provisioner.projects == {"oncology": ["breast_cancer", "gbsg2"]}  # the user's projects only
    assert provisioner.memory_mb == 3072 == site.sandbox.memory_mb
    assert loaded.ServerApp.root_dir == "/home/researcher"
    assert loaded.KernelProvisionerFactory.default_provisioner_name == "paitient-sandbox"
    assert loaded.KernelSpecManager.ensure_native_kernel is False
    # what was written is what the hub rendered from the site and the user: nothing lost in the manifest
    assert json.loads((config_dir / "jupyter_server_config.json").read_text()) == podconfig.pod_server_config(
        site, ("oncology",)
    )

    # the kernel spec the server offers is the workspace's, in the folder its config names (the volume's)
    kernel_dirs = loaded.SandboxKernelSpecManager.sandbox_kernel_dirs
    assert kernel_dirs == [f"{podconfig.JUPYTER}/data/kernels"]
    found = KernelSpecManager(kernel_dirs=[d.replace(podconfig.JUPYTER, str(into)) for d in kernel_dirs])
    assert list(found.find_kernel_specs()) == [KERNEL_NAME]
    spec = found.get_kernel_spec(KERNEL_NAME)
    assert spec.metadata["kernel_provisioner"]["provisioner_name"] == "paitient-sandbox"
    assert spec.interrupt_mode == "message"
    assert json.loads(Path(spec.resource_dir, "kernel.json").read_text()) == kernel_spec(sys.executable)

    # files the server may read but not change, folders the server writes its own files in
    for f in (config_dir / "jupyter_server_config.json", into / "data" / "kernels" / KERNEL_NAME / "kernel.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    for d in (state / "lab", state / "notary"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert loaded.LabApp.user_settings_dir == f"{podconfig.STATE}/lab/user-settings"
    assert loaded.NotebookNotary.data_dir == f"{podconfig.STATE}/notary"


def _replace(args: list[str], section: str, key: str, value: Any) -> list[str]:
    config = json.loads(option(args, "server-config"))
    config[section][key] = value
    return with_option(args, "server-config", json.dumps(config))


ATTEMPTS = {
    "launcher socket in the home": (
        lambda a: _replace(a, "SandboxProvisioner", "launcher_socket", "/home/researcher/launcher.sock"),
        "SandboxProvisioner.launcher_socket to '/home/researcher/launcher.sock', not the pod's "
        "'/run/paitient/launcher.sock'",
    ),
    "kernel specs from the home": (
        lambda a: _replace(
            a, "SandboxKernelSpecManager", "sandbox_kernel_dirs", ["/home/researcher/.local/share/jupyter/kernels"]
        ),
        "SandboxKernelSpecManager.sandbox_kernel_dirs",
    ),
    "the server's own files in the home": (
        lambda a: _replace(a, "LabApp", "user_settings_dir", "/home/researcher/.jupyter/lab/user-settings"),
        "LabApp.user_settings_dir",
    ),
    "no configuration": (lambda a: with_option(a, "server-config", None), "--server-config is required"),
    "a configuration that is not JSON": (lambda a: with_option(a, "server-config", "{not json"), "is not JSON"),
    "no volume to write": (lambda a: with_option(a, "into", None), "--into is required"),
    "written into the home": (
        lambda a: with_option(a, "into", "/home/researcher/.jupyter"),
        "--into=/home/researcher/.jupyter meets /home/researcher, which the kernels' container mounts",
    ),
    "written beside the launcher's socket": (
        lambda a: with_option(a, "state", "/run/paitient/state"),
        "--state=/run/paitient/state meets /run/paitient",
    ),
    "a relative folder": (lambda a: with_option(a, "into", "jupyter"), "--into must be an absolute, normal path"),
    "no state volume mounted": (
        lambda a: with_option(a, "state", "/var/lib/paitient/not-mounted"),
        "--state=/var/lib/paitient/not-mounted is not a folder: the manifest mounts the volume server-state there",
    ),
}


@pytest.mark.parametrize("attempt", sorted(ATTEMPTS))
async def test_the_init_container_refuses_a_configuration_that_points_elsewhere(
    site, make_user, render, tmp_path, attempt
):
    """Arguments other than the hub's (an operator's slip, a changed manifest) are refused with the reason,
    and nothing is written: the server then has no configuration and refuses to start (its extension)."""
    pod = await render(make_user("alice", ("oncology",)), profile(site))
    args, into, state = standing_in(init_container(pod)["args"], tmp_path)
    change, expected = ATTEMPTS[attempt]
    done = run_init(change(args))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "paitient-pod-config: " in done.stderr and expected in done.stderr, done.stderr
    assert list(into.iterdir()) == [] and list(state.iterdir()) == []
