"""N researchers at once: sign-in -> server -> kernel -> first cell result, against one researcher alone.

    sudo /opt/paitient/venv/bin/python benchmarks/bench_load.py [--users 50] [--singles 3] [--spawner local|docker]

Starts a workspace (`paitient up`: directory, proxy, hub, services; the local spawner, or with
``--spawner docker`` each server in a container on podman's Docker API), adds ``--users``
researchers of the oncology project to its directory, then:

1. ``--singles`` times, one researcher alone: sign in through the login form, wait for the server, start a
   kernel, run a cell that loads a dataset and prints a number; the baseline is the median;
2. all ``--users`` at once, each in a thread doing the same;
3. with every server and kernel idle, the memory each researcher costs: the proportional set size (PSS:
   shared pages split between the processes that share them) of every process of their account (server,
   kernel, its keeper), of the root wrapper that gives their server its network and, in a container, of the
   container's monitor (conmon).

Prints the success count, p50/p95 of the concurrent runs, their ratios to the baseline (goal: 50 of 50,
p95 <= 3x), the whole machine's CPU time while the crowd ran (per researcher, and the earliest the last
result could come on this many cores), and the idle memory per user (goal: <= 150 MiB). Stops the workspace
and removes its accounts.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paitient.hub.paths import SERVER_MODULE  # noqa: E402
from paitient.ops.demo import DEMO_BASE_DN  # noqa: E402
from paitient.rules.sandbox import KERNEL_MODULE  # noqa: E402
from tests import sessionlock  # noqa: E402
from tests.e2e.workspace import Workspace  # noqa: E402
from tests.groups import made_groups_removed  # noqa: E402

CELL = "from paitient import data\ndf = data.load('breast_cancer')\nprint(len(df))"


def add_researchers(ws: Workspace, names: list[str], passwords: dict[str, str]) -> None:
    ldif = []
    for i, name in enumerate(names):
        ldif.append(
            f"dn: uid={name},ou=people,{DEMO_BASE_DN}\nchangetype: add\n"
            "objectClass: inetOrgPerson\nobjectClass: posixAccount\n"
            f"uid: {name}\ncn: Load {name}\nsn: {name}\nuidNumber: {20001 + i}\ngidNumber: 10000\n"
            f"homeDirectory: /home/{name}\nuserPassword: {passwords[name]}\n"
        )
    members = "".join(f"member: uid={name},ou=people,{DEMO_BASE_DN}\n" for name in names)
    ldif.append(f"dn: cn=oncology,ou=groups,{DEMO_BASE_DN}\nchangetype: modify\nadd: member\n{members}")
    ws.directory_modify("\n".join(ldif))


def one(ws: Workspace, user: str, password: str) -> float:
    """Seconds from the login form to the first cell's output."""
    t = time.perf_counter()
    s = ws.login(user, password)
    ws.start_server(s, user, timeout=600)
    kernel = ws.start_kernel(s, user)
    out = ws.run_cell(s, user, CELL, kernel)
    if out.error is not None or out.stdout.strip() != "569":
        raise RuntimeError(f"{user}: unexpected cell result {out!r}")
    return time.perf_counter() - t


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def processes() -> list[tuple[int, int, int, bytes]]:
    """(pid, uid, ppid, cmdline) of every process."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}")
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            out.append((int(entry), st.st_uid, ppid, Path(f"/proc/{entry}/cmdline").read_bytes()))
        except (OSError, ValueError):
            continue
    return out


def net_namespace(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return ""


def kind(cmdline: bytes) -> str:
    for marker, name in (  # the wrapper's command line holds the server's command: it comes first
        (b"servernet.py", "network wrapper"),
        (b"conmon", "container monitor"),
        (SERVER_MODULE.encode(), "server"),
        (b"keeper.py", "keeper"),
        (KERNEL_MODULE.encode(), "kernel"),
    ):
        if marker in cmdline:
            return name
    return "other"


def idle_memory(ws: Workspace, users: list[str]) -> tuple[list[float], dict[str, list[float]]]:
    """MiB per user (PSS of the account's processes, of its server's network wrapper and, with the docker
    spawner, of the container's monitor), and per kind of process."""
    procs = processes()
    by_pid = {p[0]: p for p in procs}
    per_user, per_kind = [], {}
    for user in users:
        uid = ws.member(user).uid
        own = [p for p in procs if p[1] == uid]
        servers = [p for p in own if SERVER_MODULE.encode() in p[3]]
        parents = {p[2] for p in servers}
        # the local spawner's wrapper is the server's parent; the docker spawner's holds the server's namespace
        spaces = {net_namespace(p[0]) for p in servers} - {""}
        wrappers = [
            p
            for p in procs
            if b"servernet.py" in p[3] and (p[0] in parents or (p[1] == 0 and net_namespace(p[0]) in spaces))
        ]
        monitors = []
        for server in servers:  # up from the server to the container's monitor (root), if there is one
            at = by_pid.get(server[2])
            while at is not None and at[1] == uid:
                at = by_pid.get(at[2])
            if at is not None and b"conmon" in at[3]:
                monitors.append(at)
        sizes: dict[str, float] = {}
        for p in own + wrappers + monitors:
            k = kind(p[3])
            sizes[k] = sizes.get(k, 0.0) + pss_kib(p[0]) / 1024
        for k, v in sizes.items():
            per_kind.setdefault(k, []).append(v)
        per_user.append(sum(sizes.values()))
    return per_user, per_kind


def cpu_busy_seconds() -> float:
    """CPU time the whole machine has spent not idle since boot (``/proc/stat``, every core)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user .. steal; guest is inside user


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--singles", type=int, default=3)
    parser.add_argument("--idle-seconds", type=float, default=15.0)
    parser.add_argument(
        "--spawner",
        choices=("local", "docker", "both"),
        default="local",
        help="both: the local spawner, then the docker spawner, and the ratio of their single-researcher times",
    )
    args = parser.parse_args()
    sessionlock.acquire()  # the workspace makes accounts and groups a test session would remove
    spawners = ("local", "docker") if args.spawner == "both" else (args.spawner,)
    alone = {spawner: measure(spawner, args.users, args.singles, args.idle_seconds) for spawner in spawners}
    if len(alone) == 2:
        print(
            f"\nsign-in to first cell alone: docker {alone['docker']:.2f} s, local {alone['local']:.2f} s; "
            f"ratio {alone['docker'] / alone['local']:.2f} (goal <= 1.5)"
        )


def measure(spawner: str, users: int, singles_count: int, idle_seconds: float) -> float:
    """One workspace on ``spawner``: the figures printed; returns the single researcher's median time."""
    root = Path(tempfile.mkdtemp(prefix="pbl-", dir="/tmp"))
    os.chmod(root, 0o755)
    ws = Workspace(root, prefix="pbl", extra_site="", up_args=(f"--spawner={spawner}",))
    try:
        ws.start(timeout=900)  # the docker spawner builds its image at the first start
        print(f"spawner: {spawner}", flush=True)
        names = [f"load{i:03d}" for i in range(users + singles_count)]
        passwords = {name: secrets.token_hex(8) for name in names}
        add_researchers(ws, names, passwords)
        singles, crowd = names[:singles_count], names[singles_count:]

        baseline = []
        for user in singles:
            baseline.append(one(ws, user, passwords[user]))
            print(f"alone: {user} {baseline[-1]:.2f} s", flush=True)
        base = statistics.median(baseline)

        times: dict[str, float] = {}
        failures: dict[str, str] = {}

        def run(user: str) -> None:
            try:
                times[user] = one(ws, user, passwords[user])
            except Exception as e:  # noqa: BLE001 - a failed researcher is counted and reported, not fatal
                failures[user] = f"{type(e).__name__}: {e}"[:300]
                traceback.print_exc()

        busy0 = cpu_busy_seconds()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=run, args=(user,)) for user in crowd]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        busy = cpu_busy_seconds() - busy0

        time.sleep(idle_seconds)
        memory, by_kind = idle_memory(ws, [u for u in singles + crowd if u not in failures])

        ok = sorted(times.values())
        print(f"\nload: {len(ok)} of {len(crowd)} researchers got their cell result ({wall:.1f} s for all)")
        for user, why in sorted(failures.items()):
            print(f"  failed {user}: {why}")
        if ok:
            p50 = statistics.median(ok)
            p95 = ok[min(len(ok) - 1, round(0.95 * (len(ok) - 1)))]
            print(f"  alone (baseline, median of {len(baseline)}): {base:.2f} s")
            print(f"  p50 {p50:.2f} s  ratio {p50 / base:.2f}")
            print(f"  p95 {p95:.2f} s  ratio {p95 / base:.2f}  (goal <= 3)")
            cores, per = os.cpu_count() or 1, busy / len(crowd)
            # the machine's CPU time while the crowd ran (every process, the test's clients included), per
            # researcher; the last result cannot come before the crowd's CPU time spread over every core
            print(
                f"  CPU while the crowd ran: {busy:.1f} s on {cores} cores, {per:.2f} s per researcher; the last "
                f"result no sooner than {len(crowd) * per / cores:.1f} s, {len(crowd) * per / cores / base:.1f}x alone"
            )
        if memory:
            print(
                f"  idle memory per user (PSS of server, kernel, keeper, network wrapper): median "
                f"{statistics.median(memory):.0f} MiB, max {max(memory):.0f} MiB (goal <= 150), "
                f"{len(memory)} users"
            )
            for k, values in sorted(by_kind.items()):
                print(f"    {k:<16} median {statistics.median(values):6.1f} MiB")
        return base
    finally:
        ws.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    with made_groups_removed(workspace=True):  # the groups its publications made
        main()
