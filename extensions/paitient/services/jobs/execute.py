"""Training one job in the kernels' sandbox, as the runner's own account, and taking back what it made.

The worker (:mod:`paitient.services.jobs.worker`) runs with privileges dropped to ``[jobs] account``,
rlimits, bubblewrap with every namespace unshared (no network), the kernels' seccomp filter, a cleared
environment, the system and Python read-only. It sees a root-owned job folder, read-only for it (the
graph, the arrays, the plan) and an output folder of its own; it reaches no service socket and no dataset:
the rows it needs are in the job folder. It prints one JSON line per progress report and a last one with
its metrics; the runner reads those as bounded numbers and the weights file as tensors it checks against
the graph. A cancelled job's worker is killed at its next report. On a machine with an NVIDIA GPU (and
``[jobs] device`` not ``cpu``) the GPU's device nodes are bound into the sandbox, with the sysfs its driver
reads and the runner's library path (:func:`gpu_nodes`, :data:`GPU_SYSFS`, :data:`GPU_ENV`).
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from paitient import sysaccounts
from paitient.rules.sandbox import (
    SANDBOX_PATH,
    Limits,
    SandboxPolicy,
    build_bwrap_argv,
    drop_to,
    prlimit_argv,
    python_roots,
)
from paitient.rules.seccomp import seccomp_program
from paitient.services.kit.sandboxed import SandboxInit, Tail, read_lines

LOG = logging.getLogger("paitient.services.jobs")

MAX_WEIGHTS_BYTES = 1 << 30
MAX_LINE = 65536


class ExecutionFailed(RuntimeError):
    """The worker did not produce a model; the message says why (for the job's reason)."""


@dataclass(frozen=True)
class Outcome:
    weights: bytes
    report: dict[str, Any]
    """The worker's last line: ``{"done": true, "steps": n, "metrics": {...}}``."""


def ensure_account(name: str, state_dir: str | os.PathLike[str]) -> pwd.struct_passwd:
    """The runner's dedicated system account: made (no home, no shell, no password) and recorded in the
    workspace's record of its accounts if it does not exist; never a shared account such as nobody."""
    try:
        return sysaccounts.ensure_worker_account(state_dir, name, sysaccounts.JOBS)
    except sysaccounts.SystemAccountError as e:
        raise ExecutionFailed(f"the runner's account: {e}") from None


GPU_SYSFS = ("/sys/devices", "/sys/bus")
"""Read-only in the sandbox of a job with a GPU: the CUDA driver reads the device's PCI and NUMA place there."""
GPU_ENV = ("LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES")
"""The runner's own settings of these reach a job with a GPU (where the driver's libraries are, which GPUs)."""


def gpu_nodes(dev: str = "/dev") -> tuple[str, ...]:
    """The NVIDIA device nodes of this machine (``nvidiactl``, ``nvidia-uvm``, ``nvidia0``, ...): character
    devices directly in ``dev``; none on a machine without the driver."""
    try:
        names = sorted(os.listdir(dev))
    except OSError:
        return ()
    out = []
    for name in names:
        if name.startswith("nvidia"):
            path = os.path.join(dev, name)
            try:
                if stat.S_ISCHR(os.stat(path).st_mode):
                    out.append(path)
            except OSError:
                continue
    return tuple(out)


def sandbox_argv(
    *,
    uid: int,
    gid: int,
    scratch: str,
    job_dir: str,
    limits: Limits,
    seccomp_fd: int,
    gpu: tuple[str, ...] = (),
    info_fd: int | None = None,
) -> list[str]:
    """The worker's command line: as the runner's account, limited, in bubblewrap. ``gpu``: device nodes to
    bind (:func:`gpu_nodes`), with the sysfs the driver reads and the runner's :data:`GPU_ENV`."""
    env = {
        "PATH": SANDBOX_PATH,
        "HOME": os.path.join(scratch, "out"),
        "OMP_NUM_THREADS": "2",
        "PYTHONNOUSERSITE": "1",
    }
    if gpu:
        env.update({k: os.environ[k] for k in GPU_ENV if os.environ.get(k)})
    policy = SandboxPolicy(
        home=os.path.join(scratch, "out"),
        runtime_dir=os.path.join(scratch, "out"),
        run_dir=os.path.join(scratch, "run"),
        system_ro=("/usr", *python_roots()),
        env=env,
        cwd=job_dir,
        hostname="paitient-jobs",
        extra_ro=(job_dir, *(GPU_SYSFS if gpu else ("/sys/devices/system/cpu",))),
        devices=gpu,
    )
    return [
        *drop_to(uid, gid),
        *prlimit_argv(limits),
        *build_bwrap_argv(policy, seccomp_fd=seccomp_fd, info_fd=info_fd),
        sys.executable,
        "-m",
        "paitient.services.jobs.worker",
        os.path.join(job_dir, "job.json"),
    ]


def run_worker(
    *,
    program: bytes,
    arrays: dict[str, np.ndarray],
    plan: dict[str, Any],
    account: str,
    timeout: float,
    memory_mb: int,
    on_progress: Callable[[dict[str, Any]], bool],
    work_root: Path,
    state_dir: Path,
    init_weights: bytes | None = None,
) -> Outcome:
    """Train in the sandbox; ``on_progress`` gets each report and returns False to cancel. ``init_weights``:
    the initial parameters the runner loaded (a safetensors file of float32 tensors), instead of
    ``plan["init"]``'s scheme and seed."""
    pw = ensure_account(account, state_dir)
    limits = Limits(memory_mb=memory_mb, max_processes=64, max_open_files=256, cpu_seconds=int(timeout) * 4 + 1)
    work_root.mkdir(mode=0o711, parents=True, exist_ok=True)
    os.chmod(work_root, 0o711)
    scratch = Path(tempfile.mkdtemp(prefix="job-", dir=work_root))
    seccomp_fd = -1
    try:
        os.chmod(scratch, 0o711)
        (scratch / "run").mkdir(mode=0o755)
        out = scratch / "out"
        out.mkdir(mode=0o700)
        os.chown(out, pw.pw_uid, pw.pw_gid)
        job = scratch / "job"
        job.mkdir(mode=0o750)
        os.chown(job, 0, pw.pw_gid)
        _write(job / "graph.json", program, pw.pw_gid)
        np.savez(job / "arrays.npz", allow_pickle=False, **arrays)
        os.chown(job / "arrays.npz", 0, pw.pw_gid)
        os.chmod(job / "arrays.npz", 0o640)
        spec = {**plan, "graph": str(job / "graph.json"), "arrays": str(job / "arrays.npz"), "out": str(out)}
        if init_weights is not None:
            _write(job / "init.safetensors", init_weights, pw.pw_gid)
            spec["init"] = {"weights": str(job / "init.safetensors")}
        _write(job / "job.json", json.dumps(spec).encode(), pw.pw_gid)
        seccomp_fd = os.memfd_create("paitient-jobs-seccomp", 0)
        os.write(seccomp_fd, seccomp_program())
        os.lseek(seccomp_fd, 0, os.SEEK_SET)
        gpu = gpu_nodes() if plan.get("device", "auto") != "cpu" else ()
        init = SandboxInit()
        argv = sandbox_argv(
            uid=pw.pw_uid,
            gid=pw.pw_gid,
            scratch=str(scratch),
            job_dir=str(job),
            limits=limits,
            seccomp_fd=seccomp_fd,
            gpu=gpu,
            info_fd=init.info_fd,
        )
        report = _supervise(argv, seccomp_fd, timeout, on_progress, init)
        weights = out / "weights.safetensors"
        if not weights.is_file() or weights.is_symlink():
            raise ExecutionFailed("the worker finished without writing weights")
        if weights.stat().st_size > MAX_WEIGHTS_BYTES:
            raise ExecutionFailed(f"the weights file is larger than {MAX_WEIGHTS_BYTES} bytes")
        return Outcome(weights.read_bytes(), report)
    finally:
        if seccomp_fd >= 0:
            os.close(seccomp_fd)
        shutil.rmtree(scratch, ignore_errors=True)


def _supervise(
    argv: list[str],
    seccomp_fd: int,
    timeout: float,
    on_progress: Callable[[dict[str, Any]], bool],
    init: SandboxInit | None = None,
) -> dict[str, Any]:
    """Run the worker, following its progress lines (each read to at most :data:`MAX_LINE` bytes; of stderr a
    tail is kept), until it ends, is cancelled or runs past ``timeout``. ``init``: the sandbox's init, killed
    at the end, which ends everything in the sandbox: a worker whose code kept that init alive held the
    output pipe open, and the runner waited past the timeout."""
    if init is not None:
        proc = init.start(argv, stdout=subprocess.PIPE, pass_fds=(seccomp_fd,))
    else:  # a command without bubblewrap (the tests' own)
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd="/",
            env={"PATH": "/usr/bin:/bin"},
            pass_fds=(seccomp_fd,),
        )
    timed_out = threading.Event()

    def stop() -> None:
        if init is not None:
            init.kill()
        proc.kill()

    def expire() -> None:
        timed_out.set()
        stop()

    timer = threading.Timer(timeout, expire)
    timer.start()
    errors = Tail(proc.stderr)
    last: dict[str, Any] = {}
    cancelled = False
    try:
        assert proc.stdout is not None
        for raw in read_lines(proc.stdout, MAX_LINE):
            try:
                line = json.loads(raw)
            except (ValueError, RecursionError):
                continue
            if not isinstance(line, dict):
                continue
            last = line
            if not line.get("done") and not on_progress(line):
                cancelled = True
                stop()
                break
        code = proc.wait()
    finally:
        timer.cancel()
        if init is not None:
            init.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if cancelled:
        raise ExecutionFailed("cancelled")
    if timed_out.is_set():
        raise ExecutionFailed(f"the job did not finish within {timeout:g} s")
    if code != 0 or not last.get("done"):
        lines = errors.text().strip().splitlines()
        # The worker's own words stay in the runner's log (root's): an exception's message can quote a value
        # of the rows it trained on ("Target 172 is out of bounds"), and the reason goes to the job's owner
        # and into the audit trail. The reason names the exception's type only.
        LOG.warning("jobs: the training sandbox exited with status %s: %s", code, " | ".join(lines[-20:])[:8000])
        kind = exception_type(lines)
        raise ExecutionFailed(
            f"the training sandbox exited with status {code}{f' ({kind})' if kind else ''}; the operator's log "
            "has the details"
        )
    return last


KNOWN_EXCEPTIONS = frozenset(
    {n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}
    | {"OutOfMemoryError", "AcceleratorError", "GraphRefused", "TrainError", "Unsupported"}
)
"""Exception types a reason may name: Python's own and a few of torch's and the trainer's. A last line of
stderr that looks like a type but is none of these (a message's own last line can be any text) is not named."""


def exception_type(lines: list[str]) -> str:
    """The type of the exception a Python traceback in ``lines`` ends with (its last line, ``Type: message``),
    without the module or the message, when it is one of :data:`KNOWN_EXCEPTIONS`; "" otherwise."""
    if not lines:
        return ""
    name = lines[-1].split(":", 1)[0].strip().rsplit(".", 1)[-1]
    return name if name in KNOWN_EXCEPTIONS else ""


def _write(path: Path, data: bytes, gid: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        os.write(fd, data)
        os.fchown(fd, 0, gid)
    finally:
        os.close(fd)
