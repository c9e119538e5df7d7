"""Kernel start and memory: the sandboxed kernel beside the same kernel without the sandbox.

Both kernels run the same command (``python -I -m paitient.kernel.start``) over ipc sockets as the same
unprivileged system account, started by jupyter_client's KernelManager; one through the paitient-sandbox
provisioner (prlimit + bwrap + seccomp), one through the stock local provisioner. Runs alternate so that
machine noise falls on both alike. Start time is from ``start_kernel`` to the first kernel_info reply.
Memory is the RSS and PSS summed over every process of the kernel (bwrap's two processes included).

    sudo /opt/paitient/venv/bin/python benchmarks/bench_kernel_start.py [--runs 7]

Run as root, it makes a temporary system account, measures as that account, and removes it.
Prints each run, the medians, and the ratio sandboxed / plain (goal: <= 1.2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pwd
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def tree_memory(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MiB over ``pid`` and all its descendants."""
    rss = pss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += _children(p)
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss / 1024, pss / 1024


async def one_start(kind: str, kernel_dirs: str, config) -> dict:
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    ksm = KernelSpecManager(kernel_dirs=[kernel_dirs])
    runtime = Path.home() / ".local" / "share" / "jupyter" / "runtime"
    runtime.mkdir(parents=True, exist_ok=True)
    kid = secrets.token_hex(4)
    km = AsyncKernelManager(
        kernel_name=kind,
        kernel_spec_manager=ksm,
        config=config,
        transport="ipc",
        connection_file=str(runtime / f"kernel-{kid}.json"),
    )
    km.ip = str(runtime / f"b{kid}")
    t0 = time.perf_counter()
    await km.start_kernel(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=120)
        elapsed = time.perf_counter() - t0
        await asyncio.sleep(1.0)  # let the kernel settle before measuring memory
        rss, pss = tree_memory(km.provisioner.pid)
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=False)
    return {"kind": kind, "start_s": elapsed, "rss_mib": rss, "pss_mib": pss}


def worker(runs: int, workdir: Path) -> None:
    from traitlets.config import Config

    from paitient.hub.serverconfig import kernel_spec

    kernels = workdir / "kernels"
    for name, provisioner in (("sandboxed", "paitient-sandbox"), ("plain", "local-provisioner")):
        spec = kernel_spec()
        spec["metadata"]["kernel_provisioner"] = {"provisioner_name": provisioner}
        (kernels / name).mkdir(parents=True, exist_ok=True)
        (kernels / name / "kernel.json").write_text(json.dumps(spec))
    config = Config()
    config.SandboxProvisioner.run_dir = str(workdir / "run")
    config.SandboxProvisioner.data_root = str(workdir / "data")
    config.SandboxProvisioner.projects = {"onc": ["bc"]}
    results = []
    for i in range(runs):
        for kind in ("sandboxed", "plain") if i % 2 == 0 else ("plain", "sandboxed"):
            r = asyncio.run(one_start(kind, str(kernels), config))
            results.append(r)
            print(json.dumps(r), flush=True)
    print("RESULT " + json.dumps(results), flush=True)


def summarise(results: list[dict]) -> None:
    med = {}
    for kind in ("sandboxed", "plain"):
        rows = [r for r in results if r["kind"] == kind]
        med[kind] = {k: statistics.median(r[k] for r in rows) for k in ("start_s", "rss_mib", "pss_mib")}
        print(
            f"{kind:10s} start {med[kind]['start_s']:.3f} s   RSS {med[kind]['rss_mib']:.1f} MiB   "
            f"PSS {med[kind]['pss_mib']:.1f} MiB   (median of {len(rows)})"
        )
    ratio = med["sandboxed"]["start_s"] / med["plain"]["start_s"]
    print(f"start ratio sandboxed / plain: {ratio:.2f}x (goal <= 1.2x)")
    print(
        f"memory added by the sandbox: RSS {med['sandboxed']['rss_mib'] - med['plain']['rss_mib']:+.1f} MiB, "
        f"PSS {med['sandboxed']['pss_mib'] - med['plain']['pss_mib']:+.1f} MiB per kernel"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.runs, Path(args.worker))
        return
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark makes a temporary account to run the kernels as")
    root = Path(tempfile.mkdtemp(prefix="ptb-", dir="/tmp"))
    os.chmod(root, 0o755)
    name = "ptb" + secrets.token_hex(3)
    subprocess.run(
        [
            "useradd",
            "--system",
            "--no-user-group",
            "--gid",
            "nogroup",
            "--home-dir",
            str(root / name),
            "--create-home",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ],
        check=True,
    )
    try:
        user = pwd.getpwnam(name)
        work = root / name / "bench"
        (work / "run").mkdir(parents=True)
        version = root / "data" / "onc" / "bc" / "versions" / "1"
        version.mkdir(parents=True)
        (version / "data.csv").write_text("a\n1\n")
        (root / "data" / "onc" / "bc" / "current").symlink_to("versions/1")
        shutil.move(str(root / "data"), str(work / "data"))
        subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(root / name)], check=True)
        env = {"PATH": "/usr/bin:/bin", "HOME": user.pw_dir, "LANG": "C.UTF-8"}
        proc = subprocess.run(
            [
                "setpriv",
                f"--reuid={user.pw_uid}",
                f"--regid={user.pw_gid}",
                "--init-groups",
                "--",
                sys.executable,
                "-I",
                str(Path(__file__).resolve()),
                "--runs",
                str(args.runs),
                "--worker",
                str(work),
            ],
            env=env,
            cwd=user.pw_dir,
            capture_output=True,
            text=True,
        )
        lines = proc.stdout.splitlines()
        for line in lines:
            if not line.startswith("RESULT "):
                print(line)
        results = [json.loads(line[7:]) for line in lines if line.startswith("RESULT ")]
        if proc.returncode or not results:
            sys.exit(f"benchmark worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        summarise(results[0])
    finally:
        subprocess.run(["userdel", "--remove", name], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
