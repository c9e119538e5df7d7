"""Running the membership-inference audit in a sandbox like a kernel's, and judging its numbers.

The researcher's model definition is code, so it runs where code from the workspace runs: in the kernels'
sandbox (:mod:`paitient.rules.sandbox`: bubblewrap, seccomp, rlimits) as an unprivileged account
(``nobody`` by default), with no network, no service sockets, a read-only system and Python environment,
and a root-owned job folder holding only the model source, the weights and the rows needed.
The service takes back one JSON line of numbers (:mod:`paitient.services.airlock.mia_worker`), rounded before it is
stored so the model's outputs cannot carry more than a few bits out through them.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from paitient.rules import membership
from paitient.rules.disclosure import result
from paitient.rules.sandbox import SANDBOX_PATH, Limits, SandboxPolicy, build_bwrap_argv, drop_to, prlimit_argv
from paitient.rules.seccomp import seccomp_program

WORKER = Path(__file__).with_name("mia_worker.py")
STATISTICS = Path(membership.__file__)
"""The attack statistics the worker imports from its folder (pure numpy, no paitient)."""
DIGITS = 3


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
    *, uid: int, gid: int, scratch: str, job_dir: str, prefix: str, python: str, limits: Limits, seccomp_fd: int | None
) -> list[str]:
    """The command that runs the worker: privileges dropped, rlimits set, then the kernels' bubblewrap policy.

    ``--pdeathsig=KILL`` (kept through the exec of prlimit and bwrap) ends the sandbox when the service dies,
    and bwrap's ``--die-with-parent`` ends what runs inside it.

    The policy is the one every kernel gets (:mod:`paitient.rules.sandbox`): all namespaces unshared,
    no capabilities, the seccomp filter, a minimal /etc, read-only system and Python. Its home is an empty
    scratch folder (the account's only writable place, removed afterwards); its service-socket folder is
    an empty one, so the model code reaches no service; there is no dataset mount: the rows it needs are
    in the job folder, which belongs to root and is read-only for the account.
    """
    system_ro = ("/usr",) if prefix.startswith("/usr/") else ("/usr", prefix)
    policy = SandboxPolicy(
        home=scratch,
        runtime_dir=scratch,
        run_dir=os.path.join(scratch, "run"),
        system_ro=system_ro,
        env={"PATH": SANDBOX_PATH, "HOME": scratch, "OMP_NUM_THREADS": "1", "PYTHONNOUSERSITE": "1"},
        cwd=job_dir,
        hostname="airlock-audit",
    )
    return [
        *drop_to(uid, gid),
        *prlimit_argv(limits),
        *build_bwrap_argv(policy, seccomp_fd=seccomp_fd),
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
    account: str = "nobody",
    timeout: float = 600.0,
    limits: Limits | None = None,
    work_root: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Run the audit in the sandbox; return the worker's numbers or ``{"error": ...}``."""
    pw = pwd.getpwnam(account)
    limits = limits or Limits(memory_mb=4096, max_processes=64, max_open_files=256, cpu_seconds=int(timeout) + 1)
    scratch = Path(tempfile.mkdtemp(prefix="audit-" if work_root else "paitient-audit-", dir=work_root))
    seccomp_fd = None
    try:
        os.chown(scratch, pw.pw_uid, pw.pw_gid)
        os.chmod(scratch, 0o700)
        (scratch / "run").mkdir(mode=0o755)
        work = scratch / "job"
        work.mkdir()
        os.chown(work, 0, pw.pw_gid)
        os.chmod(work, 0o750)
        files = {
            "worker.py": WORKER.read_bytes(),
            "membership.py": STATISTICS.read_bytes(),
            "model.py": job.model_source.encode("utf-8"),
            "weights.safetensors": job.weights,
        }
        for name, data in files.items():
            _write(work / name, data, pw.pw_gid)
        job.data[[*job.features, job.target]].reset_index(drop=True).to_parquet(work / "data.parquet")
        os.chown(work / "data.parquet", 0, pw.pw_gid)
        os.chmod(work / "data.parquet", 0o640)
        spec = {
            "model_source": str(work / "model.py"),
            "weights": str(work / "weights.safetensors"),
            "data": str(work / "data.parquet"),
            "members": job.members,
            "features": job.features,
            "target": job.target,
            "loss": job.loss,
            "model_class": job.model_class,
            "model_kwargs": job.model_kwargs or {},
            "preprocess": job.preprocess,
        }
        _write(work / "job.json", json.dumps(spec).encode(), pw.pw_gid)
        seccomp_fd = os.memfd_create("paitient-audit-seccomp", 0)
        os.write(seccomp_fd, seccomp_program())
        os.lseek(seccomp_fd, 0, os.SEEK_SET)
        argv = sandbox_argv(
            uid=pw.pw_uid,
            gid=pw.pw_gid,
            scratch=str(scratch),
            job_dir=str(work),
            prefix=sys.prefix,
            python=sys.executable,
            limits=limits,
            seccomp_fd=seccomp_fd,
        )
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                timeout=timeout,
                cwd="/",
                env={"PATH": "/usr/bin:/bin"},
                pass_fds=(seccomp_fd,),
            )
        except subprocess.TimeoutExpired:
            return {"error": f"the audit did not finish within {timeout:g} s"}
        lines = proc.stdout.decode("utf-8", "replace").strip().splitlines()
        if proc.returncode != 0 or not lines:
            tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
            return {"error": f"the audit sandbox exited with status {proc.returncode}: {' | '.join(tail)}"[:2000]}
        try:
            answer = json.loads(lines[-1])
        except ValueError:
            return {"error": "the audit sandbox did not answer with JSON"}
        return answer if isinstance(answer, dict) else {"error": "the audit sandbox answered no object"}
    finally:
        if seccomp_fd is not None:
            os.close(seccomp_fd)
        shutil.rmtree(scratch, ignore_errors=True)


def _write(path: Path, data: bytes, gid: int) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chown(path, 0, gid)
    os.chmod(path, 0o640)


def judge(answer: dict[str, Any], *, max_auc: float, max_advantage: float) -> dict[str, Any]:
    """Turn the worker's answer into a check result; only rounded numbers are kept."""
    if "error" in answer:
        # The message may come from the researcher's code: the steward sees it, the requester sees the reason.
        return result(
            "membership_inference",
            "error",
            "the membership-inference audit could not run the model; a steward reviews by hand",
            error=str(answer["error"])[:2000],
        )
    try:
        numbers = {
            k: round(float(answer[k]), DIGITS) for k in ("auc", "advantage", "member_loss_mean", "nonmember_loss_mean")
        }
        counts = {k: int(answer[k]) for k in ("members", "nonmembers")}
    except (KeyError, TypeError, ValueError):
        return result("membership_inference", "error", "the audit answered without its numbers")
    auc, adv = numbers["auc"], numbers["advantage"]
    details = {**numbers, **counts, "max_auc": max_auc, "max_advantage": max_advantage}
    if auc > max_auc or adv > max_advantage:
        return result(
            "membership_inference",
            "fail",
            f"a loss-threshold attack tells training rows from held-out rows (AUC {auc:.3f}, advantage "
            f"{adv:.3f}; limits {max_auc:g} and {max_advantage:g}): the model memorises its training "
            "data; train with a smaller epsilon, fewer epochs or more regularisation",
            **details,
        )
    return result(
        "membership_inference",
        "pass",
        f"a loss-threshold attack barely tells training rows from held-out rows (AUC {auc:.3f}, "
        f"advantage {adv:.3f}; limits {max_auc:g} and {max_advantage:g})",
        **details,
    )
