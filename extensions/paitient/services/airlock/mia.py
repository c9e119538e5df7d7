"""The airlock's own membership-inference audit of weights trained in a kernel, and judging its numbers.

The researcher's model definition is code, so it runs where code from the workspace runs: in the kernels'
sandbox (:mod:`paitient.rules.sandbox`: bubblewrap, seccomp, rlimits) as an unprivileged account
(``[airlock] audit_account``), with no network, no service sockets, a read-only system and Python
environment, and a root-owned job folder holding only the model source, the weights and the feature rows.

The sandbox computes nothing the airlock judges. It gets the rows preprocessed and shuffled by the airlock,
without targets and without any sign of which rows trained the model, and returns the model's outputs in
one binary frame (:mod:`paitient.services.airlock.mia_worker`); what the process prints is never read. The
airlock computes each row's loss with the true targets, then the attacks (:func:`audit_numbers`): typed
numbers of two significant digits, both sides of 0.5 counting.
"""

from __future__ import annotations

import io
import json
import os
import pwd
import secrets
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from paitient.config.traits import SHARED_ACCOUNTS
from paitient.rules import membership
from paitient.rules.disclosure import result
from paitient.rules.sandbox import (
    SANDBOX_PATH,
    Limits,
    Mount,
    SandboxPolicy,
    build_bwrap_argv,
    drop_to,
    prlimit_argv,
)
from paitient.rules.seccomp import seccomp_program
from paitient.services.kit.sandboxed import SandboxInit, Tail

WORKER = Path(__file__).with_name("mia_worker.py")
FRAME_MAGIC = b"PAITIENT-OUTPUTS/1\n"
"""The start of the worker's output frame (:mod:`paitient.services.airlock.mia_worker`)."""
MAX_OUTPUT_COLUMNS = 4096
MAX_OUTPUT_BYTES = 1 << 30
OUTPUTS = "outputs.bin"
"""The worker's outputs file in the scratch folder: made by the airlock, the one host file the sandbox can
write, bound into its tmpfs home."""


@dataclass(frozen=True)
class AuditJob:
    model_source: str
    weights: bytes
    data: pd.DataFrame
    members: list[int]
    features: list[str]
    target: str
    loss: str = "cross_entropy"
    model_class: str = "Model"
    model_kwargs: dict[str, Any] | None = None
    preprocess: str = "none"


def sandbox_argv(
    *,
    uid: int,
    gid: int,
    scratch: str,
    job_dir: str,
    prefix: str,
    python: str,
    limits: Limits,
    seccomp_fd: int | None,
    info_fd: int | None = None,
) -> list[str]:
    """The command that runs the worker: privileges dropped, rlimits set, then the kernels' bubblewrap policy.

    ``--pdeathsig=KILL`` (kept through the exec of prlimit and bwrap) ends the sandbox when the service dies,
    and bwrap's ``--die-with-parent`` ends what runs inside it.

    The policy is the one every kernel gets (:mod:`paitient.rules.sandbox`): all namespaces unshared,
    no capabilities, the seccomp filter, a minimal /etc, read-only system and Python. Its home is an empty
    tmpfs of the sandbox's /tmp size at the scratch folder's path, so what the model code writes never
    reaches the host's disk; the one host file it can write is the outputs file (:data:`OUTPUTS`), which
    ``limits.max_file_bytes`` bounds. Its service-socket folder is an empty one, so the model code reaches
    no service; there is no dataset mount: the rows it needs are in the job folder, which belongs to root
    and is read-only for the account.
    """
    system_ro = ("/usr",) if prefix.startswith("/usr/") else ("/usr", prefix)
    out = os.path.join(scratch, OUTPUTS)
    policy = SandboxPolicy(
        home=scratch,
        runtime_dir=scratch,
        run_dir=os.path.join(scratch, "run"),
        system_ro=system_ro,
        env={"PATH": SANDBOX_PATH, "HOME": scratch, "OMP_NUM_THREADS": "1", "PYTHONNOUSERSITE": "1"},
        cwd=job_dir,
        hostname="airlock-audit",
        home_tmpfs=True,
        home_mounts=(Mount(job_dir, job_dir), Mount(out, out, writable=True)),
    )
    return [
        *drop_to(uid, gid),
        *prlimit_argv(limits),
        *build_bwrap_argv(policy, seccomp_fd=seccomp_fd, info_fd=info_fd),
        python,
        "-I",
        os.path.join(job_dir, "worker.py"),
        os.path.join(job_dir, "job.json"),
    ]


def prepare_work_root(path: str | os.PathLike[str]) -> Path:
    """The folder the audits' scratch folders go in (0711 root: the audit account can traverse it, not list
    it), emptied of what an audit interrupted by a crash left behind (a copy of dataset columns)."""
    root = Path(path)
    root.mkdir(mode=0o711, parents=True, exist_ok=True)
    os.chown(root, 0, 0)
    os.chmod(root, 0o711)
    for stale in root.iterdir():
        shutil.rmtree(stale, ignore_errors=True)
    return root


def run_audit(
    job: AuditJob,
    *,
    account: str,
    timeout: float = 600.0,
    limits: Limits | None = None,
    work_root: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Run the model in the sandbox on the rows, then compute the attacks here from its outputs; return the
    numbers (:func:`audit_numbers`) or ``{"error": ...}``."""
    rows = prepared_rows(job)
    order = np.random.default_rng(secrets.randbits(64)).permutation(len(rows))
    outputs = run_model(job, rows[order], account=account, timeout=timeout, limits=limits, work_root=work_root)
    if isinstance(outputs, dict):
        return outputs
    restored = np.empty_like(outputs)
    restored[order] = outputs
    try:
        return audit_numbers(job, restored)
    except ValueError as e:
        return {"error": str(e)}


def prepared_rows(job: AuditJob) -> np.ndarray:
    """The feature rows the model sees, preprocessed here (``standardize``: with the members' mean and spread)."""
    x = job.data[job.features].to_numpy(dtype=np.float64)
    if job.preprocess == "standardize":
        members = x[job.members]
        mu, sd = members.mean(axis=0), members.std(axis=0)
        x = (x - mu) / np.where(sd > 0, sd, 1.0)
    return np.ascontiguousarray(x, dtype=np.float32)


def run_model(
    job: AuditJob,
    rows: np.ndarray,
    *,
    account: str,
    timeout: float = 600.0,
    limits: Limits | None = None,
    work_root: str | os.PathLike[str] | None = None,
) -> np.ndarray | dict[str, Any]:
    """The model's outputs for ``rows`` (one row of outputs each), computed in the sandbox as ``account``;
    or ``{"error": ...}``. Only the worker's output frame is read, never what the process prints. ``account``
    is the audit's dedicated account (``[airlock] audit_account``), never a shared one such as nobody."""
    if account in SHARED_ACCOUNTS:
        raise ValueError(f"the audit may not run as the shared account {account!r}; use a dedicated one")
    pw = pwd.getpwnam(account)
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        raise ValueError(f"the audit may not run as {account!r}: it has uid or gid 0")
    limits = limits or Limits(memory_mb=4096, max_processes=64, max_open_files=256, cpu_seconds=int(timeout) + 1)
    # no file of the sandbox's grows past one frame of these rows (the outputs file is the only one on disk)
    frame = len(FRAME_MAGIC) + 8 + min(MAX_OUTPUT_BYTES, len(rows) * MAX_OUTPUT_COLUMNS * 4)
    limits = replace(limits, max_file_bytes=frame)
    scratch = Path(tempfile.mkdtemp(prefix="audit-" if work_root else "paitient-audit-", dir=work_root))
    seccomp_fd = None
    try:
        # root's, 0711: the account reaches the job folder and the outputs file, and writes nothing else here
        os.chmod(scratch, 0o711)
        (scratch / "run").mkdir(mode=0o755)
        work = scratch / "job"
        work.mkdir()
        os.chown(work, 0, pw.pw_gid)
        os.chmod(work, 0o750)
        buf = io.BytesIO()
        np.save(buf, rows, allow_pickle=False)
        files = {
            "worker.py": WORKER.read_bytes(),
            "model.py": job.model_source.encode("utf-8"),
            "weights.safetensors": job.weights,
            "x.npy": buf.getvalue(),
        }
        for name, data in files.items():
            _write(work / name, data, pw.pw_gid)
        out = scratch / OUTPUTS
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.fchown(fd, pw.pw_uid, pw.pw_gid)
        os.close(fd)
        spec = {
            "model_source": str(work / "model.py"),
            "weights": str(work / "weights.safetensors"),
            "x": str(work / "x.npy"),
            "out": str(out),
            "model_class": job.model_class,
            "model_kwargs": job.model_kwargs or {},
        }
        _write(work / "job.json", json.dumps(spec).encode(), pw.pw_gid)
        seccomp_fd = os.memfd_create("paitient-audit-seccomp", 0)
        os.write(seccomp_fd, seccomp_program())
        os.lseek(seccomp_fd, 0, os.SEEK_SET)
        init = SandboxInit()
        argv = sandbox_argv(
            uid=pw.pw_uid,
            gid=pw.pw_gid,
            scratch=str(scratch),
            job_dir=str(work),
            prefix=sys.prefix,
            python=sys.executable,
            limits=limits,
            seccomp_fd=seccomp_fd,
            info_fd=init.info_fd,
        )
        # What the model prints is never read: stdout goes nowhere, and of stderr a tail is kept (a model
        # writing gigabytes had the service hold them all).
        proc = init.start(argv, stdout=subprocess.DEVNULL, pass_fds=(seccomp_fd,))
        try:
            errors = Tail(proc.stderr)
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"the audit did not finish within {timeout:g} s"}
        finally:
            init.kill()  # the whole sandbox, whatever its code did to its init
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if code != 0:
            tail = errors.text().strip().splitlines()[-3:]
            return {"error": f"the audit sandbox exited with status {code}: {' | '.join(tail)}"[:2000]}
        return read_frame(out, len(rows))
    finally:
        if seccomp_fd is not None:
            os.close(seccomp_fd)
        shutil.rmtree(scratch, ignore_errors=True)


def read_frame(path: Path, rows: int) -> np.ndarray | dict[str, Any]:
    """The outputs in the worker's frame at ``path``: exactly ``rows`` rows of finite float32, and nothing
    after them; anything else is an error (a second answer, a forged or truncated one)."""
    head = len(FRAME_MAGIC) + 8
    try:
        # not blocking: the model's account owns the folder, and a FIFO put in the file's place held the
        # airlock's one check thread for ever
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return {"error": "the audit wrote no outputs"}
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_OUTPUT_BYTES + head:
            return {"error": "the audit's outputs are not a file of the size the airlock reads"}
        data = os.read(fd, st.st_size + 1)
    finally:
        os.close(fd)
    if not data.startswith(FRAME_MAGIC) or len(data) < head:
        return {"error": "the audit's outputs are not in the airlock's frame"}
    n, k = struct.unpack("<II", data[len(FRAME_MAGIC) : head])
    if n != rows or not 1 <= k <= MAX_OUTPUT_COLUMNS or len(data) != head + n * k * 4:
        return {"error": f"the audit answered {n} x {k} outputs in {len(data)} bytes, not one frame of {rows} rows"}
    outputs = np.frombuffer(data, dtype="<f4", offset=head).reshape(n, k).astype(np.float64)
    if not np.isfinite(outputs).all():
        return {"error": "the model's outputs hold NaN or infinite values"}
    return outputs


def row_losses(outputs: np.ndarray, targets: np.ndarray, loss: str) -> np.ndarray:
    """Each row's loss from the model's outputs and the true targets (which never entered the sandbox)."""
    if loss == "cross_entropy":
        y = targets.astype(np.int64)
        if outputs.shape[1] < 2 or y.min() < 0 or y.max() >= outputs.shape[1]:
            raise ValueError(
                f"cross_entropy needs one output per class: the model gives {outputs.shape[1]}, the target "
                f"has values {int(y.min())}..{int(y.max())}"
            )
        top = outputs.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(outputs - top).sum(axis=1)) + top[:, 0]
        return np.asarray(log_norm - outputs[np.arange(len(y)), y])
    if loss == "bce":
        z, t = outputs.reshape(len(outputs), -1)[:, 0], targets.astype(np.float64)
        return np.asarray(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z))))
    if loss == "mse":
        t = targets.astype(np.float64).reshape(len(targets), -1)
        return np.asarray(((outputs - t) ** 2).mean(axis=1))
    raise ValueError(f"unknown loss {loss!r}; use cross_entropy, bce or mse")


def audit_numbers(job: AuditJob, outputs: np.ndarray) -> dict[str, Any]:
    """The attacks on the model's ``outputs`` (rows in the data's order), computed by the airlock: each
    attack's ``|AUC - 0.5|`` with its bootstrap interval (:func:`paitient.rules.membership.attack_numbers`),
    the loss-threshold attack's advantage, and the held-out accuracy for classifiers; 2 significant digits."""
    targets = job.data[job.target].to_numpy()
    members = np.zeros(len(targets), dtype=bool)
    members[job.members] = True
    if members.all() or not members.any():
        raise ValueError("the audit needs training rows and held-out rows")
    losses = row_losses(outputs, targets, job.loss)
    keys = targets.astype(np.float64)
    numbers: dict[str, Any] = membership.attack_numbers(
        losses[members], losses[~members], keys[members], keys[~members], classes=job.loss != "mse", seed=0
    )
    _, advantage = membership.roc_auc_advantage(-losses[members], -losses[~members])
    numbers["mia_advantage"] = float(f"{advantage:.2g}")
    if job.loss == "cross_entropy":
        hits = outputs[~members].argmax(axis=1) == targets[~members].astype(np.int64)
        numbers["holdout_accuracy"] = float(f"{hits.mean():.2g}")
    numbers["members"], numbers["nonmembers"] = int(members.sum()), int((~members).sum())
    return numbers


def _write(path: Path, data: bytes, gid: int) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chown(path, 0, gid)
    os.chmod(path, 0o640)


def judge_gap(metrics: dict[str, Any], allowed: float, source: str) -> tuple[str, str]:
    """Status and reason from the attacks' ``|AUC - 0.5|`` and intervals (``mia_loss``, ``mia_calibrated``):
    the whole interval above ``allowed`` shows memorisation (fail); the estimate above it but the interval
    reaching below is not settled by so few rows (review); else pass. ``source`` says who measured."""
    attacks = [a for a in ("mia_loss", "mia_calibrated") if isinstance(metrics.get(a), int | float)]
    if not attacks:
        return "fail", f"{source} holds no membership-inference numbers"
    worst = max(attacks, key=lambda a: float(metrics[a]))
    gap, low = float(metrics[worst]), float(metrics.get(f"{worst}_low", metrics[worst]))
    if low > allowed:
        status, verdict = "fail", "the attack tells training rows apart beyond doubt"
    elif gap > allowed:
        status, verdict = "review", "the estimate is above the bound, but the interval reaches below it"
    else:
        status, verdict = "pass", "within the bound"
    reason = (
        f"{source} ({worst}): |AUC - 0.5| = {gap:g}, 95% interval from {low:g}; the project's bound is "
        f"{allowed:g}: {verdict}"
    )
    return status, reason


def judge(answer: dict[str, Any], *, max_auc: float, max_advantage: float) -> dict[str, Any]:
    """The check result of the airlock's own audit of ``answer`` (:func:`run_audit`): both sides of 0.5
    count, and the loss-threshold attack's advantage has its own bound."""
    if "error" in answer:
        # The message may come from the researcher's code: the steward sees it, the requester sees the reason.
        return result(
            "membership_inference",
            "error",
            "the membership-inference audit could not run the model; a steward reviews by hand",
            error=str(answer["error"])[:2000],
        )
    numbers = {k: v for k, v in answer.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    details = {**numbers, "max_auc": max_auc, "max_advantage": max_advantage}
    status, reason = judge_gap(numbers, max_auc - 0.5, "the airlock's audit of the model's outputs")
    advantage = float(numbers.get("mia_advantage", 0.0))
    if advantage > max_advantage:
        status = "fail"
        reason += f"; the loss-threshold attack's advantage {advantage:g} is above {max_advantage:g}"
    if status == "fail":
        reason += (
            ": the model memorises its training data; train with a smaller epsilon, fewer epochs or more regularisation"
        )
    return result("membership_inference", status, reason, **details)
