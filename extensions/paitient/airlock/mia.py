"""Running the membership-inference audit in a sandbox like a kernel's, and judging its numbers.

The researcher's model definition is code, so it runs where code from the workspace runs: in bubblewrap,
as an unprivileged account (``nobody`` by default), with no network, a read-only view of /usr and the
Python environment, and a job directory holding only the model source, the weights and the rows needed.
The service takes back one JSON line of numbers (:mod:`paitient.airlock.mia_worker`), rounded before it is
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

from paitient.airlock.tables import result

WORKER = Path(__file__).with_name("mia_worker.py")
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


def bwrap_argv(*, uid: int, gid: int, job_dir: str, prefix: str, python: str) -> list[str]:
    """The command that runs the worker: privileges dropped first, then bubblewrap as that account."""
    argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--no-new-privs", "bwrap",
            "--ro-bind", "/usr", "/usr"]
    for link in ("lib", "lib64", "bin", "sbin"):
        if os.path.islink(f"/{link}"):
            argv += ["--symlink", os.readlink(f"/{link}"), f"/{link}"]
    argv += ["--ro-bind", "/etc", "/etc"]
    if not prefix.startswith("/usr/"):
        argv += ["--ro-bind", prefix, prefix]
    argv += [
        "--ro-bind", job_dir, "/audit",
        "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",  # noqa: S108 - a fresh tmpfs inside the sandbox
        "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
        "--cap-drop", "ALL", "--clearenv",
        "--setenv", "HOME", "/tmp",  # noqa: S108
        "--setenv", "PATH", "/usr/bin", "--setenv", "OMP_NUM_THREADS", "1",
        "--chdir", "/audit",
        python, "-I", "/audit/worker.py", "/audit/job.json",
    ]
    return argv


def run_audit(job: AuditJob, *, account: str = "nobody", timeout: float = 600.0) -> dict[str, Any]:
    """Run the audit in the sandbox; return the worker's numbers or ``{"error": ...}``."""
    pw = pwd.getpwnam(account)
    work = Path(tempfile.mkdtemp(prefix="paitient-audit-"))
    try:
        os.chown(work, 0, pw.pw_gid)
        os.chmod(work, 0o750)
        files = {
            "worker.py": WORKER.read_bytes(),
            "model.py": job.model_source.encode("utf-8"),
            "weights.safetensors": job.weights,
        }
        for name, data in files.items():
            _write(work / name, data, pw.pw_gid)
        job.data[[*job.features, job.target]].reset_index(drop=True).to_parquet(work / "data.parquet")
        os.chown(work / "data.parquet", 0, pw.pw_gid)
        os.chmod(work / "data.parquet", 0o640)
        spec = {
            "model_source": "/audit/model.py", "weights": "/audit/weights.safetensors",
            "data": "/audit/data.parquet", "members": job.members, "features": job.features,
            "target": job.target, "loss": job.loss, "model_class": job.model_class,
            "model_kwargs": job.model_kwargs or {}, "preprocess": job.preprocess,
        }
        _write(work / "job.json", json.dumps(spec).encode(), pw.pw_gid)
        argv = bwrap_argv(uid=pw.pw_uid, gid=pw.pw_gid, job_dir=str(work), prefix=sys.prefix,
                          python=sys.executable)
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=timeout, cwd="/", env={"PATH": "/usr/bin:/bin"})
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
        shutil.rmtree(work, ignore_errors=True)


def _write(path: Path, data: bytes, gid: int) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chown(path, 0, gid)
    os.chmod(path, 0o640)


def judge(answer: dict[str, Any], *, max_auc: float, max_advantage: float) -> dict[str, Any]:
    """Turn the worker's answer into a check result; only rounded numbers are kept."""
    if "error" in answer:
        # The message may come from the researcher's code: the steward sees it, the requester sees the reason.
        return result("membership_inference", "error",
                      "the membership-inference audit could not run the model; a steward reviews by hand",
                      error=str(answer["error"])[:2000])
    try:
        numbers = {k: round(float(answer[k]), DIGITS) for k in ("auc", "advantage", "member_loss_mean",
                                                                "nonmember_loss_mean")}
        counts = {k: int(answer[k]) for k in ("members", "nonmembers")}
    except (KeyError, TypeError, ValueError):
        return result("membership_inference", "error", "the audit answered without its numbers")
    auc, adv = numbers["auc"], numbers["advantage"]
    details = {**numbers, **counts, "max_auc": max_auc, "max_advantage": max_advantage}
    if auc > max_auc or adv > max_advantage:
        return result("membership_inference", "fail",
                      f"a loss-threshold attack tells training rows from held-out rows (AUC {auc:.3f}, advantage "
                      f"{adv:.3f}; limits {max_auc:g} and {max_advantage:g}): the model memorises its training "
                      "data; train with a smaller epsilon, fewer epochs or more regularisation", **details)
    return result("membership_inference", "pass",
                  f"a loss-threshold attack barely tells training rows from held-out rows (AUC {auc:.3f}, "
                  f"advantage {adv:.3f}; limits {max_auc:g} and {max_advantage:g})", **details)


