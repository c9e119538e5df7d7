"""A job's sandbox on a machine with a GPU: the GPU's device nodes, the sysfs its driver reads and the runner's
library path reach the worker; nothing of it reaches a job that trains on the CPU, or a machine without one.

This machine has no GPU: the binding is proven with a device node the test makes (a copy of /dev/null under
a name of its own), bound by the real bubblewrap the runner uses; the GPU itself was exercised on a GPU
machine with ``benchmarks/bench_jobs.py --device cuda`` and a job through the real runner (docs/jobs.md).
"""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from paitient.rules.sandbox import Limits, PolicyError, SandboxPolicy, build_bwrap_argv
from paitient.services.jobs import execute


def pairs(argv, flag):
    return [(argv[i + 1], argv[i + 2]) for i, a in enumerate(argv) if a == flag]


def test_the_gpu_nodes_are_the_nvidia_character_devices(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("this test makes device nodes: run the suite as root (bash .ci/run does)")
    for name in ("nvidia0", "nvidiactl", "nvidia-uvm"):
        os.mknod(tmp_path / name, 0o666 | 0o020000, os.makedev(1, 3))  # character devices
    (tmp_path / "nvidia-not-a-device").write_text("")
    os.mknod(tmp_path / "null", 0o666 | 0o020000, os.makedev(1, 3))
    assert execute.gpu_nodes(str(tmp_path)) == tuple(str(tmp_path / n) for n in ("nvidia-uvm", "nvidia0", "nvidiactl"))
    assert execute.gpu_nodes(str(tmp_path / "missing")) == ()


def test_a_job_with_a_gpu_gets_its_nodes_sysfs_and_library_path_and_one_without_gets_none(monkeypatch):
    monkeypatch.setenv("LD_LIBRARY_PATH", "/usr/local/nvidia/lib64")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("SECRET_OF_THE_RUNNER", "x")
    common = dict(uid=900, gid=900, scratch="/var/lib/paitient/jobs-work/job-1", job_dir="/j", limits=Limits())
    with_gpu = execute.sandbox_argv(**common, seccomp_fd=5, gpu=("/dev/nvidia0", "/dev/nvidiactl"))
    assert pairs(with_gpu, "--dev-bind") == [("/dev/nvidia0", "/dev/nvidia0"), ("/dev/nvidiactl", "/dev/nvidiactl")]
    assert {s for s, _ in pairs(with_gpu, "--ro-bind-try")} >= set(execute.GPU_SYSFS)
    env = dict(pairs(with_gpu, "--setenv"))
    assert env["LD_LIBRARY_PATH"] == "/usr/local/nvidia/lib64" and env["CUDA_VISIBLE_DEVICES"] == "0"
    assert "SECRET_OF_THE_RUNNER" not in env

    cpu = execute.sandbox_argv(**common, seccomp_fd=5)
    assert "--dev-bind" not in cpu
    assert [s for s, _ in pairs(cpu, "--ro-bind-try") if s.startswith("/sys")] == ["/sys/devices/system/cpu"]
    assert "LD_LIBRARY_PATH" not in dict(pairs(cpu, "--setenv"))


@pytest.mark.parametrize("node", ["/etc/passwd", "/dev/../etc/shadow", "nvidia0"])
def test_a_device_outside_dev_is_refused(node):
    policy = SandboxPolicy(home="/h", runtime_dir="/h/rt", run_dir="/run/p", devices=(node,))
    with pytest.raises(PolicyError, match="must be a node under /dev/"):
        build_bwrap_argv(policy)


def test_a_bound_device_node_is_usable_in_the_sandbox_and_absent_without_it(tmp_path):
    """The real bubblewrap: a node bound is there and works (it is a null device: writes vanish, reads end at
    once); the same sandbox without it has no such node."""
    if os.geteuid() != 0:
        pytest.fail("this test makes a device node in /dev: run the suite as root (bash .ci/run does)")
    node = f"/dev/paitient-test-{uuid.uuid4().hex[:8]}"
    os.mknod(node, 0o666 | 0o020000, os.makedev(1, 3))
    try:
        home = tmp_path / "home"
        home.mkdir()
        probe = f"test -c {node} && echo written > {node} && cat {node} && echo ok"
        for devices, expect in (((node,), "ok"), ((), "")):
            policy = SandboxPolicy(home=str(home), runtime_dir=str(home), run_dir=str(tmp_path), devices=devices)
            out = subprocess.run(
                [*build_bwrap_argv(policy), "/bin/sh", "-c", probe],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert out.stdout.strip() == expect, (devices, out.stdout, out.stderr)
    finally:
        os.unlink(node)
