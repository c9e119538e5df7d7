"""The provisioner's own decisions (a real instance; kernels themselves run in tests/attacks)."""

import os
import pwd
import uuid

import pytest
from jupyter_client.kernelspec import KernelSpec

from paitient.rules.sandbox import PolicyError
from paitient.server.provisioner import SandboxProvisioner


def provisioner(**config) -> SandboxProvisioner:
    spec = KernelSpec(
        argv=["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        display_name="x",
        language="python",
        interrupt_mode="signal",
    )
    return SandboxProvisioner(kernel_id=str(uuid.uuid4()), kernel_spec=spec, **config)


async def test_refuses_to_run_as_root():
    assert os.geteuid() == 0  # the test suite runs as root, as the brief says
    with pytest.raises(PolicyError, match="refusing to start a sandboxed kernel as root"):
        await provisioner(run_dir="/x", data_root="/y").pre_launch()


def test_policy_needs_the_site_paths():
    with pytest.raises(PolicyError, match="write_user_server_config"):
        provisioner().policy("/root/.local/share/jupyter/runtime/kernel-x.json", None)


def test_policy_mounts_the_configured_projects_and_stays_in_the_home(tmp_path):
    v = tmp_path / "onc" / "bc" / "versions" / "2"
    v.mkdir(parents=True)
    (tmp_path / "onc" / "bc" / "current").symlink_to("versions/2")
    p = provisioner(run_dir="/srv/run", data_root=str(tmp_path), projects={"onc": ["bc"]})
    home = pwd.getpwuid(os.getuid()).pw_dir
    pol = p.policy(f"{home}/.local/share/jupyter/runtime/kernel-1.json", cwd="/etc")
    assert pol.home == home and pol.cwd == home  # a working dir outside the home falls back to it
    assert [(m.source, m.dest) for m in pol.data] == [(str(v), "/data/onc/bc")]
    assert pol.env["PAITIENT_RUN_DIR"] == "/srv/run"
    assert pol.system_ro[0] == "/usr" and any(p.endswith("paitient") or "venv" in p for p in pol.system_ro[1:])


def test_limits_come_from_configuration(tmp_path):
    p = provisioner(memory_mb=100, max_processes=7, max_open_files=33, cpu_seconds=5)
    assert vars(p.limits()) == {
        "memory_mb": 100,
        "max_processes": 7,
        "max_open_files": 33,
        "cpu_seconds": 5,
        "max_file_bytes": 0,  # a kernel's files: bounded by its home's disk, as any account's
    }
    # the sizes of /tmp and /dev/shm too, where the server builds the sandbox itself
    sized = provisioner(run_dir="/srv/run", data_root=str(tmp_path), tmp_bytes=3 << 20)
    home = pwd.getpwuid(os.getuid()).pw_dir
    assert sized.policy(f"{home}/.local/share/jupyter/runtime/kernel-1.json", cwd=None).tmp_bytes == 3 << 20
