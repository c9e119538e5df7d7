"""Private training through the real workspace: hub sign-in, a sandboxed kernel, real Opacus accounting on
the published datasets, and the privacy ledger service outside the kernel.

Tests that need a small budget or kill kernels run in a workspace of their own (``small``), where a
steward sets the budgets with ``paitient ledger set-budget``; each test either has a dataset to itself
or counts only what it changed, so none depends on what another spent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pwd
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from opacus.accountants import PRVAccountant
from opacus.accountants.utils import get_noise_multiplier

from paitient.config import load
from paitient.kernel.dp.run import default_delta
from paitient.rules.sandbox import KERNEL_MODULE
from paitient.services.kit.process import process_start
from paitient.services.ledger.store import Ledger
from paitient.services.ledger.web import shown_budget
from tests.e2e.workspace import PAITIENT, Workspace, own_workspace
from tests.kernelclient import execute_request

# the root-side PRV recomputations below warn about RDP orders, as make_private used to in the kernel
pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")]

# Kernel-side helpers, run once in each kernel: load a published dataset as standardised tensors, and the
# plain training loop of docs/privacy.md.
PRELUDE = """
import json, os, time
import numpy as np, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from paitient import data, dp
from paitient.kernel.ledger import LedgerClient

TARGETS = {"breast_cancer": "target", "gbsg2": "cens", "diabetes": "progression"}

def tabular(name):
    df = data.load(name)
    y = df[TARGETS[name]].to_numpy()
    if name == "diabetes":
        y = (y > np.median(y)).astype("int64")
    x = df.drop(columns=[TARGETS[name]]).select_dtypes("number").to_numpy(dtype="float32")
    sd = x.std(0)
    x = (x - x.mean(0)) / np.where(sd > 0, sd, 1)
    return TensorDataset(torch.tensor(x), torch.tensor(y, dtype=torch.int64))

def train(run, pause=0.0, mark_at=None):
    for epoch in range(run.epochs):
        for xb, yb in run.data_loader:
            run.optimizer.zero_grad()
            run.criterion(run.model(xb), yb).backward()
            run.optimizer.step()
            if pause:
                time.sleep(pause)
            if run.steps == mark_at:
                print("TRAINING", run.reservation, flush=True)
print("ready")
"""


def cell_json(ws: Workspace, s, user: str, code: str, kernel: str, timeout: float = 180.0) -> dict:
    out = ws.run_cell(s, user, code, kernel_id=kernel, timeout=timeout)
    assert out.error is None, (out.error, out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def kernel_for(ws: Workspace, s, user: str) -> str:
    kernel = ws.start_kernel(s, user)
    out = ws.run_cell(s, user, PRELUDE, kernel_id=kernel, timeout=120)
    assert out.error is None and out.stdout.strip() == "ready", (out.error, out.stderr[-2000:])
    return kernel


def signed_in(ws: Workspace, user: str):
    s = ws.login(user)
    ws.start_server(s, user)
    return s


def root_ledger(ws: Workspace) -> Ledger:
    """The ledger's store read directly, as root (what stewards and the airlock see)."""
    return Ledger(load(ws.site_file))


def dataset_row(ledger: Ledger, project: str, dataset: str, member: str | None = None) -> dict:
    """The ledger's budget row of ``dataset``; with ``member``, as that member is shown it (her part included)."""
    return next(b for b in ledger.budget(project, member) if b["dataset"] == dataset)


def set_budget(ws: Workspace, project: str, dataset: str, epsilon: float, delta: float = 1e-5) -> None:
    r = subprocess.run(
        [
            *PAITIENT,
            "ledger",
            "set-budget",
            *ws.args(),
            f"--project={project}",
            f"--dataset={dataset}",
            f"--epsilon={epsilon}",
            f"--delta={delta}",
            "--steward=sam",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr


def start_cell_until(ws: Workspace, s, user: str, kernel: str, code: str, marker: str, timeout: float = 120.0) -> str:
    """Send ``code`` to the kernel and return its output so far once ``marker`` appears; the cell runs on."""

    async def run() -> str:
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        cookie = "; ".join(f"{c.name}={c.value}" for c in s.cookies)
        url = ws.url.replace("http://", "ws://") + f"user/{user}/api/kernels/{kernel}/channels"
        conn = await websocket_connect(HTTPRequest(url, headers={"Cookie": cookie, **ws.xsrf_headers(s, user)}))
        request = execute_request(code, user)
        msg_id = request["header"]["msg_id"]
        conn.write_message(json.dumps({**request, "channel": "shell", "buffers": []}))
        seen = ""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                raw = await asyncio.wait_for(conn.read_message(), timeout=max(0.1, deadline - time.monotonic()))
                if raw is None:
                    raise RuntimeError(f"kernel websocket closed; output so far: {seen!r}")
                msg = json.loads(raw) if isinstance(raw, str) else {}
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                if msg["msg_type"] == "stream":
                    seen += msg["content"]["text"]
                    if marker in seen:
                        return seen
                elif msg["msg_type"] == "error":
                    raise AssertionError(f"{msg['content']['ename']}: {msg['content']['evalue']}")
                elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    raise AssertionError(f"cell finished without {marker!r}: {seen!r}")
        finally:
            conn.close()
        raise TimeoutError(f"no {marker!r} within {timeout}s: {seen!r}")

    return asyncio.run(run())


@pytest.fixture(scope="module")
def small():
    """A workspace of this module's own, for small budgets and killed kernels."""
    with own_workspace("paitient-dp-e2e-", "ptd") as ws:
        yield ws


# -- 1. the record is the accountant's --------------------------------------------------------------------

TRAIN_AND_SAVE = """
ds = tabular("breast_cancer")
torch.manual_seed(0)
model = nn.Linear(ds.tensors[0].shape[1], 2)
run = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), DataLoader(ds, batch_size=64),
                      target_epsilon=0.5, epochs=2, max_grad_norm=1.0, project="oncology",
                      dataset="breast_cancer", criterion=nn.CrossEntropyLoss(), progress=False)
train(run)
path = os.path.join(os.environ["HOME"], "dp-e2e-model.safetensors")
saved = dp.save_weights(run.model, path)
"""

REPORT = """
accountant_epsilon = run.accountant.get_epsilon(delta=run.target_delta)
mine = [r for r in LedgerClient().records("oncology", "breast_cancer") if r["id"] == run.reservation]
print(json.dumps({"reservation": run.reservation, "accountant_epsilon": accountant_epsilon, "saved": saved,
                  "path": path, "mode": run.mode, "rows": len(ds), "batches": len(run.data_loader),
                  "seen_by_kernel": mine}))
"""


@pytest.mark.timeout(300)
def test_record_holds_the_accountants_epsilon_and_the_weights_hash(workspace):
    alice = signed_in(workspace, "alice")
    kernel = kernel_for(workspace, alice, "alice")
    out = workspace.run_cell(alice, "alice", TRAIN_AND_SAVE, kernel_id=kernel)
    # nothing in red that the researcher cannot act on (Opacus' PRV grid sizing warns about RDP orders)
    assert out.error is None and out.stderr == "", (out.error, out.stderr[-3000:])
    got = cell_json(workspace, alice, "alice", REPORT, kernel)
    site = load(workspace.site_file)
    run = root_ledger(workspace).run(got["reservation"])
    assert run is not None and run["state"] == "settled" and run["username"] == "alice"
    rec = run["record"]

    # the ledger holds exactly what the kernel's PRV accountant reported, not more than was reserved
    assert rec["epsilon"] == run["epsilon_spent"] == got["accountant_epsilon"]
    assert 0.4 < rec["epsilon"] <= 0.5 == run["epsilon"]
    # and that is what a fresh accountant says for the recorded noise, sample rate and steps
    batches = got["batches"]
    assert batches == -(-got["rows"] // 64) and rec["sample_rate"] == 1 / batches
    assert rec["steps"] == rec["planned_steps"] == 2 * batches and rec["epochs"] == 2
    assert rec["delta"] == run["delta_spent"] == default_delta(1e-5, got["rows"])
    assert rec["noise_multiplier"] == get_noise_multiplier(
        target_epsilon=0.5,
        target_delta=rec["delta"],
        sample_rate=rec["sample_rate"],
        steps=rec["steps"],
        accountant="prv",
    )
    fresh = PRVAccountant()
    fresh.history = [(rec["noise_multiplier"], rec["sample_rate"], rec["steps"])]
    assert fresh.get_epsilon(delta=rec["delta"]) == pytest.approx(rec["epsilon"], rel=1e-9)

    assert rec["mode"] == got["mode"] == "fast" and rec["accountant"] == "prv" and rec["max_grad_norm"] == 1.0
    assert rec["model"] == "Linear" and rec["dataset"] == "breast_cancer"
    manifest = json.loads((site.data_root / "oncology" / "breast_cancer" / "current" / "manifest.json").read_text())
    assert rec["dataset_version"] == manifest["version"]

    # the file save_weights wrote in alice's home hashes to the record's SHA-256
    home = pwd.getpwnam(workspace.member("alice").account).pw_dir
    assert got["path"].startswith(home + "/")
    digest = hashlib.sha256(Path(got["path"]).read_bytes()).hexdigest()
    assert digest == got["saved"] == rec["weights_sha256"] == run["weights_sha256"]
    assert root_ledger(workspace).record_by_hash(digest)["id"] == got["reservation"]
    # the ledger service shows the kernel its own run as stored, without process details
    assert [r["record"] for r in got["seen_by_kernel"]] == [rec] and "pid" not in got["seen_by_kernel"][0]


# -- 2. a budget that is used up refuses ------------------------------------------------------------------

ASK = """
ds = tabular("breast_cancer")
model = nn.Linear(ds.tensors[0].shape[1], 2)
try:
    run = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), DataLoader(ds, batch_size=64),
                          target_epsilon={eps}, epochs={epochs}, max_grad_norm=1.0, project="oncology",
                          dataset="breast_cancer", criterion=nn.CrossEntropyLoss(), progress={progress})
except dp.BudgetExceeded as e:
    print(json.dumps({{"refused": str(e)}}))
else:
    {then}
    print(json.dumps({{"refused": None, "reservation": run.reservation, "record": run.record}}))
"""


@pytest.mark.timeout(300)
def test_budget_refused_when_exhausted(small):
    set_budget(small, "oncology", "breast_cancer", 1.0)
    alice = signed_in(small, "alice")
    kernel = kernel_for(small, alice, "alice")
    ledger = root_ledger(small)

    ask = ASK.format(eps=1.5, epochs=2, then="train(run)", progress=False)
    too_much = cell_json(small, alice, "alice", ask, kernel)
    assert too_much["refused"].startswith(
        "privacy budget exceeded: epsilon 1.5 asked, but oncology/breast_cancer has 1 left of 1 "
        "(0 spent, 0 reserved by running trainings)"
    ), too_much
    assert "ask a data steward for more budget" in too_much["refused"]
    assert ledger.runs("oncology", "breast_cancer") == []  # refused before anything was reserved

    # this one as a researcher runs it, with the progress bar: JupyterLab gets tqdm's widget
    shown = small.run_cell(
        alice, "alice", ASK.format(eps=0.8, epochs=3, then="train(run)", progress=True), kernel_id=kernel
    )
    assert shown.error is None, (shown.error, shown.stderr[-2000:])
    first = json.loads(shown.stdout.strip().splitlines()[-1])
    assert first["refused"] is None
    assert (
        "paitient.kernel.dp: mode fast (" in shown.stdout
        and "reserved epsilon 0.8, delta 1e-06 of oncology/breast_cancer" in shown.stdout
    ), shown.stdout
    assert any(
        o["msg_type"] == "display_data" and "application/vnd.jupyter.widget-view+json" in o["content"]["data"]
        for o in shown.outputs
    )
    widgets = json.dumps([o["content"] for o in shown.outputs if o["msg_type"].startswith("comm_")])
    assert "private training (fast) on oncology/breast_cancer" in widgets, widgets[-3000:]
    spent = first["record"]["epsilon_spent"]
    assert f"epsilon {spent:.3g} of 0.8, settled" in widgets.replace("\\u2007", " "), widgets[-3000:]
    assert 0.7 < spent <= 0.8

    second = cell_json(small, alice, "alice", ASK.format(eps=0.5, epochs=2, then="train(run)", progress=False), kernel)
    assert second["refused"] is not None and second["refused"].startswith(
        f"privacy budget exceeded: epsilon 0.5 asked, but oncology/breast_cancer has {1.0 - spent:g} left of 1 "
        f"({spent:g} spent, 0 reserved by running trainings)"
    ), second

    # what is left can still be used: the refusal is about the numbers, not a locked dataset
    rest = cell_json(
        small,
        alice,
        "alice",
        ASK.format(eps=round(1.0 - spent - 0.01, 4), epochs=1, then="run.finish()", progress=False),
        kernel,
    )
    assert rest["refused"] is None and rest["record"]["epsilon_spent"] == 0.0  # no step, nothing spent
    row = dataset_row(ledger, "oncology", "breast_cancer")
    assert row["source"] == "steward" and row["epsilon_total"] == 1.0
    assert row["epsilon_spent"] == spent and row["epsilon_reserved"] == 0.0 and row["runs"] == 2
    assert [r["state"] for r in ledger.runs("oncology", "breast_cancer")] == ["settled", "settled"]


# -- 3. concurrent reservations ---------------------------------------------------------------------------

RACE = """
ds = tabular("gbsg2")
model = nn.Linear(ds.tensors[0].shape[1], 2)
loader = DataLoader(ds, batch_size=64)
while time.time() < {start}:
    time.sleep(0.002)
t0 = time.time()
try:
    run = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), loader, target_epsilon=0.3,
                          epochs=1, max_grad_norm=1.0, project="oncology", dataset="gbsg2",
                          criterion=nn.CrossEntropyLoss(), progress=False)
    out = {{"reservation": run.reservation, "refused": None}}
except dp.BudgetExceeded as e:
    run, out = None, {{"reservation": None, "refused": str(e)}}
out.update(t0=t0, t1=time.time())
print(json.dumps(out))
"""


SETTLE_OTHERS = """
try:
    LedgerClient().settle("RESERVATION", 0.0, {})
    print(json.dumps("settled"))
except Exception as e:
    print(json.dumps([getattr(e, "code", ""), str(e)]))
"""


@pytest.mark.timeout(400)
def test_concurrent_reservations_never_exceed_the_budget(small):
    set_budget(small, "oncology", "gbsg2", 1.0)
    sessions = {user: signed_in(small, user) for user in ("alice", "carol")}
    # two kernels each for alice and carol, both in oncology: four runs of 0.3 race for a budget of 1.0
    kernels = [(user, kernel_for(small, sessions[user], user)) for user in ("alice", "carol", "alice", "carol")]
    code = RACE.format(start=time.time() + 10)
    with ThreadPoolExecutor(len(kernels)) as pool:
        got = list(pool.map(lambda uk: cell_json(small, sessions[uk[0]], uk[0], code, uk[1]), kernels))

    assert max(g["t0"] for g in got) < min(g["t1"] for g in got), got  # the calls overlapped in time
    won = [(uk, g) for uk, g in zip(kernels, got, strict=True) if g["refused"] is None]
    lost = [g for g in got if g["refused"] is not None]
    assert len(won) == 3 and len(lost) == 1, got
    # refused while the three others held their reservations, with the numbers
    assert lost[0]["refused"].startswith(
        "privacy budget exceeded: epsilon 0.3 asked, but oncology/gbsg2 has 0.1 left of 1 "
        "(0 spent, 0.9 reserved by running trainings)"
    ), lost
    ledger = root_ledger(small)
    row = dataset_row(ledger, "oncology", "gbsg2")
    assert row["epsilon_reserved"] == pytest.approx(0.9) and row["epsilon_spent"] == 0.0
    assert row["epsilon_reserved"] + row["epsilon_spent"] <= row["epsilon_total"]
    assert {r["username"] for r in ledger.runs("oncology", "gbsg2")} <= {"alice", "carol"}

    # a kernel cannot release someone else's reservation to make room (same project, other user)
    held = {uk[0]: g["reservation"] for uk, g in won}
    if len(held) == 2:
        victim, thief = "alice", "carol"
    else:  # both of one user's kernels won: the other user's kernel is the thief
        victim = next(iter(held))
        thief = "carol" if victim == "alice" else "alice"
    thief_kernel = next(k for u, k in kernels if u == thief)
    attempt = SETTLE_OTHERS.replace("RESERVATION", held[victim])
    assert cell_json(small, sessions[thief], thief, attempt, thief_kernel) == [
        "forbidden",
        "this reservation belongs to another user",
    ]
    assert ledger.run(held[victim])["state"] == "reserved"

    # the winners train and settle: what they spent is the accountants' and fits the budget
    def finish(item):
        (user, kernel), g = item
        return cell_json(small, sessions[user], user, "train(run); print(json.dumps(run.record))", kernel)

    with ThreadPoolExecutor(len(won)) as pool:
        records = list(pool.map(finish, won))
    assert {r["id"] for r in records} == {g["reservation"] for _, g in won}
    row = dataset_row(ledger, "oncology", "gbsg2")
    assert row["epsilon_reserved"] == 0.0 and row["runs"] == 3
    assert row["epsilon_spent"] == pytest.approx(sum(r["epsilon_spent"] for r in records))
    assert 0.6 < row["epsilon_spent"] <= 0.9 and row["epsilon_spent"] + row["epsilon_left"] == pytest.approx(1.0)


# -- 4. a kernel that dies mid-training -------------------------------------------------------------------

SLOW_TRAINING = """
ds = tabular("diabetes")
model = nn.Linear(ds.tensors[0].shape[1], 2)
run = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(ds, batch_size=32),
                      target_epsilon=2.0, epochs=50, max_grad_norm=1.0, project="cardiometabolic",
                      dataset="diabetes", criterion=nn.CrossEntropyLoss(), progress=False)
train(run, pause=0.05, mark_at=5)  # a slow model: the kill lands mid-training
print("FINISHED")
"""

BUDGET_VIEW = """
c = LedgerClient()
print(json.dumps({"budget": c.budget("cardiometabolic"), "runs": c.records("cardiometabolic", "diabetes")}))
"""


def wait_idle(ws: Workspace, s, user: str, kernel: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while ws.api(s, user, "GET", f"kernels/{kernel}").json()["execution_state"] != "idle":
        assert time.monotonic() < deadline, "the interrupted kernel did not become idle"
        time.sleep(0.2)


def wait_gone(pid: int, start: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while process_start(pid) == start:
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.1)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["sigkill", "shutdown", "restart"])
def test_kernel_killed_mid_training_counts_its_whole_reservation(small, how):
    bob = signed_in(small, "bob")
    kernel = kernel_for(small, bob, "bob")
    ledger = root_ledger(small)
    before = dataset_row(ledger, "cardiometabolic", "diabetes")

    seen = start_cell_until(small, bob, "bob", kernel, SLOW_TRAINING, "TRAINING")
    reservation = seen.split("TRAINING", 1)[1].split()[0]
    run = ledger.run(reservation)
    assert run["state"] == "reserved" and run["epsilon"] == 2.0
    # the ledger knows the kernel by its host pid (the kernel sees another pid in its namespace): bob's process
    pid, start = run["pid"], run["pid_start"]
    status = Path(f"/proc/{pid}/status").read_text()
    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    assert int(uid) == small.member("bob").uid and process_start(pid) == start
    assert KERNEL_MODULE in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")

    if how == "sigkill":  # the kernel process dies (out of memory, a crash)
        os.kill(pid, signal.SIGKILL)
    elif how == "shutdown":  # JupyterLab's "Shut Down Kernel"
        r = small.api(bob, "bob", "DELETE", f"kernels/{kernel}")
        assert r.status_code == 204, r.text
    else:  # JupyterLab's "Restart Kernel": same kernel id, a new process
        r = small.api(bob, "bob", "POST", f"kernels/{kernel}/restart")
        assert r.status_code == 200 and r.json()["id"] == kernel, r.text
    wait_gone(pid, start)

    # what bob's next kernel is told: the run is lost and counts in full, not the few steps it took
    after = kernel_for(small, bob, "bob")
    view = cell_json(small, bob, "bob", BUDGET_VIEW, after)
    row = next(b for b in view["budget"]["projects"]["cardiometabolic"] if b["dataset"] == "diabetes")
    mine = next(r for r in view["runs"] if r["id"] == reservation)
    assert mine["state"] == "lost" and mine["epsilon_spent"] is None and mine["record"] is None
    assert row["epsilon_spent"] == pytest.approx(before["epsilon_spent"] + 2.0)
    assert row["epsilon_left"] == pytest.approx(before["epsilon_left"] - 2.0)
    assert row["epsilon_reserved"] == before["epsilon_reserved"] == 0.0
    assert row == dataset_row(ledger, "cardiometabolic", "diabetes", "bob")
    assert row["epsilon_left_member"] == row["epsilon_left"]  # the project shares no budget: all of it is his

    # dp.budget() shows it to bob as widgets (the table's numbers travel in the widget's state) ...
    shown = small.run_cell(bob, "bob", 'dp.budget("cardiometabolic")', kernel_id=after)
    assert shown.error is None, shown.stderr[-2000:]
    states = json.dumps([o["content"]["data"] for o in shown.outputs if o["msg_type"] == "comm_open"])
    assert "Privacy budget of cardiometabolic" in states, states[:2000]
    assert f"<td>{row['epsilon_spent']:.4g}</td><td>0</td><td><b>{row['epsilon_left']:.4g}</b></td>" in states
    # ... and the stewards' page to sam (the page first: its visit signs sam in to the service)
    sam = small.login("sam")
    page = sam.get(small.url + "services/ledger/", timeout=30)
    assert page.status_code == 200 and '<tr class="lost">' in page.text and reservation in page.text
    steward = sam.get(small.url + "services/ledger/api/budget", timeout=30)
    assert steward.status_code == 200, steward.text[-300:]
    run = next(r for r in steward.json()["projects"]["cardiometabolic"]["runs"] if r["id"] == reservation)
    assert run["state"] == "lost" and run["username"] == "bob" and run["epsilon"] == 2.0


SLOW_STEP = """
class SlowSGD(torch.optim.SGD):
    # an optimizer step that takes long, as Adam's on a large model does: an interrupt most likely lands
    # inside it, after the parameters took the noisy gradient
    updates = 0

    def step(self, closure=None):
        out = super().step(closure)
        SlowSGD.updates += 1
        time.sleep(1.0)
        return out

ds = tabular("diabetes")
model = nn.Linear(ds.tensors[0].shape[1], 2)
run = dp.make_private(model, SlowSGD(model.parameters(), lr=0.1), DataLoader(ds, batch_size=32),
                      target_epsilon=2.0, epochs=20, max_grad_norm=1.0, project="cardiometabolic",
                      dataset="diabetes", criterion=nn.CrossEntropyLoss(), progress=False, mode="{mode}")
train(run, mark_at=3)
"""

AFTER_INTERRUPT = """
print(json.dumps({"steps": run.steps, "updates": SlowSGD.updates, "settled": run.finish(),
                  "accountant_epsilon": run.accountant.get_epsilon(delta=run.target_delta)}))
"""

# the same, with the interrupt raised exactly where it lands most of the time: after the update
INTERRUPT_AFTER_UPDATE = """
class Interrupted(torch.optim.SGD):
    updates = 0

    def step(self, closure=None):
        out = super().step(closure)
        Interrupted.updates += 1
        if Interrupted.updates == 3:
            raise KeyboardInterrupt
        return out

model = nn.Linear(ds.tensors[0].shape[1], 2)
run = dp.make_private(model, Interrupted(model.parameters(), lr=0.1), DataLoader(ds, batch_size=32),
                      target_epsilon=0.5, epochs=2, max_grad_norm=1.0, project="cardiometabolic",
                      dataset="diabetes", criterion=nn.CrossEntropyLoss(), progress=False, mode="{mode}")
try:
    train(run)
except KeyboardInterrupt:
    pass
print(json.dumps({"steps": run.steps, "updates": Interrupted.updates, "settled": run.finish()}))
"""


def recomputed_epsilon(settled: dict, steps: int) -> float:
    fresh = PRVAccountant()
    fresh.history = [(settled["record"]["noise_multiplier"], settled["record"]["sample_rate"], steps)]
    return fresh.get_epsilon(delta=settled["delta_spent"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["fast", "hooks"])
def test_interrupted_training_settles_every_step_that_changed_the_model(small, mode):
    bob = signed_in(small, "bob")
    kernel = kernel_for(small, bob, "bob")
    ledger = root_ledger(small)
    before = dataset_row(ledger, "cardiometabolic", "diabetes")
    start_cell_until(small, bob, "bob", kernel, SLOW_STEP.replace("{mode}", mode), "TRAINING")
    r = small.api(bob, "bob", "POST", f"kernels/{kernel}/interrupt")  # JupyterLab's "Interrupt kernel"
    assert r.status_code == 204, r.text
    wait_idle(small, bob, "bob", kernel)  # a cell sent while the interrupted one ends would be aborted
    got = cell_json(small, bob, "bob", AFTER_INTERRUPT, kernel)
    settled = got["settled"]
    # every step that updated the parameters is counted (one more if the interrupt landed inside the step,
    # before the update), in the record's steps and in epsilon
    assert got["updates"] >= 3 and got["updates"] <= got["steps"] <= got["updates"] + 1, got
    assert settled["record"]["steps"] == got["steps"] and settled["state"] == "settled"
    assert settled["epsilon_spent"] == got["accountant_epsilon"] < 2.0
    assert settled["epsilon_spent"] == pytest.approx(recomputed_epsilon(settled, got["steps"]), rel=1e-9)
    # the rest of the reservation is released
    row = dataset_row(ledger, "cardiometabolic", "diabetes")
    assert row["epsilon_reserved"] == 0.0
    assert row["epsilon_spent"] == pytest.approx(before["epsilon_spent"] + settled["epsilon_spent"])

    exact = cell_json(small, bob, "bob", INTERRUPT_AFTER_UPDATE.replace("{mode}", mode), kernel)
    assert exact["steps"] == exact["updates"] == exact["settled"]["record"]["steps"] == 3, exact
    assert exact["settled"]["epsilon_spent"] == pytest.approx(recomputed_epsilon(exact["settled"], 3), rel=1e-9)


# -- the ledger service crashes while a kernel trains -------------------------------------------------------

HOLD = """
ds = tabular("diabetes")
model = nn.Linear(ds.tensors[0].shape[1], 2)
run = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(ds, batch_size=64),
                      target_epsilon=0.5, epochs=2, max_grad_norm=1.0, project="cardiometabolic",
                      dataset="diabetes", criterion=nn.CrossEntropyLoss(), progress=False)
print(json.dumps({"reservation": run.reservation}))
"""


def ledger_service_pid(ws: Workspace) -> int:
    """The ledger service of this workspace (the hub runs it as a managed service, as root)."""
    want = f"--state-dir={ws.state_dir}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"paitient.cli" in args and b"service" in args and b"ledger" in args and want in args:
            return int(entry.name)
    raise AssertionError("no ledger service runs for this workspace")


@pytest.mark.timeout(300)
def test_ledger_killed_while_a_kernel_trains_is_restarted_and_the_run_settles(small):
    bob = signed_in(small, "bob")
    kernel = kernel_for(small, bob, "bob")
    reservation = cell_json(small, bob, "bob", HOLD, kernel)["reservation"]
    old = ledger_service_pid(small)
    os.kill(old, signal.SIGKILL)
    wait_gone(old, process_start(old) or 0)

    # training ends while the ledger is down: the run cannot settle, and the researcher is told what to do
    out = small.run_cell(bob, "bob", "train(run)", kernel_id=kernel)
    assert out.error is not None and out.error.startswith("LedgerUnavailable: "), out
    assert "is not running" in out.error and "run.finish()" in out.error, out.error
    run = root_ledger(small).run(reservation)
    assert run["state"] == "reserved" and run["epsilon"] == 0.5  # committed before the crash, still held

    # the hub restarts its managed service; the kernel, still alive, settles then
    deadline = time.monotonic() + 90
    while True:
        try:
            if ledger_service_pid(small) != old:
                break
        except AssertionError:
            pass
        assert time.monotonic() < deadline, "the hub did not restart the ledger service" + small.logs()
        time.sleep(0.5)
    settle = (
        "import json\nfor i in range(100):\n    try:\n        rec = run.finish(); break\n"
        "    except dp.LedgerUnavailable:\n        time.sleep(0.3)\nprint(json.dumps(rec))"
    )
    settled = cell_json(small, bob, "bob", settle, kernel)
    assert settled["id"] == reservation and settled["state"] == "settled"
    assert 0.4 < settled["epsilon_spent"] <= 0.5 and settled["record"]["steps"] == settled["record"]["planned_steps"]
    assert root_ledger(small).run(reservation)["state"] == "settled"
    # the restarted service serves the stewards' page again (once its web thread listens, after the socket)
    sam, deadline = small.login("sam"), time.monotonic() + 30
    while (page := sam.get(small.url + "services/ledger/", timeout=30)).status_code == 503:
        assert time.monotonic() < deadline, "the restarted ledger serves no page" + small.logs()
        time.sleep(0.5)
    assert page.status_code == 200 and reservation in page.text, page.text[-500:]


# -- 5. a model that cannot be trained privately ----------------------------------------------------------

BATCHNORM = """
class Net(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.hidden = nn.Linear(d, 16)
        self.norm = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        return self.out(torch.relu(self.norm(self.hidden(x))))

ds = tabular("breast_cancer")
model = Net(ds.tensors[0].shape[1])
dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), DataLoader(ds, batch_size=64),
                target_epsilon=0.5, epochs=2, max_grad_norm=1.0, project="oncology", dataset="breast_cancer",
                criterion=nn.CrossEntropyLoss(), progress=False)
"""


@pytest.mark.timeout(300)
def test_batchnorm_model_refused_with_the_layer_and_the_fix_nothing_reserved(workspace):
    alice = signed_in(workspace, "alice")
    kernel = kernel_for(workspace, alice, "alice")
    ledger = root_ledger(workspace)
    runs_before = ledger.runs("oncology")
    out = workspace.run_cell(alice, "alice", BATCHNORM, kernel_id=kernel)
    assert out.error is not None and out.error.startswith(
        "DPModelError: this model cannot be trained with differential privacy as it is:"
    ), out
    assert "layer 'norm' (BatchNorm1d(16))" in out.error
    assert "replace it with nn.LayerNorm(16) or nn.GroupNorm(8, 16)" in out.error
    assert "not GroupNorm(16, 16)" in out.error and "paitient does not rewrite models" in out.error
    # the model was left as it was, and the ledger holds no new run
    check = workspace.run_cell(alice, "alice", "print(type(model.norm).__name__)", kernel_id=kernel)
    assert check.stdout.strip() == "BatchNorm1d"
    assert ledger.runs("oncology") == runs_before


# -- 6. another project's budget --------------------------------------------------------------------------

OTHER_PROJECT = """
ds = tabular("diabetes")
model = nn.Linear(ds.tensors[0].shape[1], 2)
out = {"datasets": sorted(os.listdir("/data"))}
try:
    dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), DataLoader(ds, batch_size=32),
                    target_epsilon=0.5, epochs=1, max_grad_norm=1.0, project="oncology",
                    dataset="breast_cancer", progress=False)
except ValueError as e:
    out["make_private"] = str(e)
# past make_private, straight to the ledger service: the service decides, from the socket's peer
for op, call in (("reserve", lambda c: c.reserve("oncology", "breast_cancer", 0.1, 1e-7, run_id="x")),
                 ("budget", lambda c: c.budget("oncology")),
                 ("records", lambda c: c.records("oncology"))):
    try:
        out[op] = ["answered", call(LedgerClient())]
    except dp.LedgerUnavailable as e:
        out[op] = ["unavailable", str(e)]
    except Exception as e:
        out[op] = [getattr(e, "code", type(e).__name__), str(e)]
print(json.dumps(out))
"""


@pytest.mark.timeout(300)
def test_member_of_another_project_cannot_charge_its_budget(workspace):
    bob = signed_in(workspace, "bob")
    ledger = root_ledger(workspace)
    before = (ledger.runs("oncology"), ledger.budget("oncology"))
    got = cell_json(workspace, bob, "bob", OTHER_PROJECT, kernel_for(workspace, bob, "bob"))
    assert got["datasets"] == ["cardiometabolic"]
    assert got["make_private"] == "you are not a member of project 'oncology'; yours: cardiometabolic"
    assert got["reserve"] == [
        "forbidden",
        "you are not a member of project 'oncology'; a kernel can charge only its user's projects",
    ]
    for op in ("budget", "records"):
        assert got[op] == [
            "forbidden",
            "you are not a member of project 'oncology'; a kernel can use only its user's projects",
        ], op
    assert (ledger.runs("oncology"), ledger.budget("oncology")) == before


# -- 7. the stewards' ledger page through the hub ---------------------------------------------------------

SMALL_RUN = """
ds = tabular("diabetes")
model = nn.Linear(ds.tensors[0].shape[1], 2)
run = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(ds, batch_size=64),
                      target_epsilon=0.2, epochs=1, max_grad_norm=1.0, project="cardiometabolic",
                      dataset="diabetes", criterion=nn.CrossEntropyLoss(), progress=False)
train(run)
print(json.dumps(run.record))
"""


@pytest.mark.timeout(300)
def test_stewards_ledger_page_through_the_hub(workspace):
    carol = signed_in(workspace, "carol")
    made = cell_json(workspace, carol, "carol", SMALL_RUN, kernel_for(workspace, carol, "carol"))
    page_url = workspace.url + "services/ledger/"

    sam = workspace.login("sam")  # the first visit runs the hub's OAuth for the service
    page = sam.get(page_url, timeout=30)
    assert page.status_code == 200 and page.url == page_url, page.text[-500:]
    assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert "Signed in as sam" in page.text and "<script" not in page.text
    assert "<h2>oncology</h2>" in page.text and "<h2>cardiometabolic</h2>" in page.text
    assert (
        f"<td>carol</td><td>settled</td><td>0.2</td><td>{made['epsilon_spent']:.4g}</td>"
        '<td class="trained-by">a kernel (self-reported)</td><td>fast</td>'
        f"<td>{made['record']['steps']}</td><td><code>{made['weights_sha256'][:16]}</code></td>"
        f"<td>{made['id']}</td>"
    ) in page.text

    api = sam.get(page_url + "api/budget", timeout=30)
    assert api.status_code == 200 and api.headers["Content-Type"] == "application/json"
    view = api.json()
    assert view["user"] == "sam" and set(view["projects"]) == {"oncology", "cardiometabolic"}
    ledger = root_ledger(workspace)
    for project, data in view["projects"].items():
        assert data["budget"] == [shown_budget(b) for b in ledger.budget(project)]  # to four significant digits
        assert [r["id"] for r in data["runs"]] == [r["id"] for r in ledger.runs(project)]
    shown = next(r for r in view["projects"]["cardiometabolic"]["runs"] if r["id"] == made["id"])
    assert shown["record"] == made["record"] and shown["username"] == "carol" and "pid" not in shown

    # researchers, even members of the projects, are not stewards; without a session there is nothing
    for user, s in (("alice", workspace.login("alice")), ("carol", carol)):
        denied = s.get(page_url, timeout=30)
        assert denied.status_code == 403 and "not allowed" in denied.text and made["id"] not in denied.text, user
        denied = s.get(page_url + "api/budget", timeout=30)
        body = denied.json()
        assert denied.status_code == 403 and body["status"] == 403 and "custom:ledger:read" in body["error"], user
        assert made["id"] not in denied.text
    anonymous = requests.get(page_url + "api/budget", timeout=30)
    assert anonymous.status_code == 403 and made["id"] not in anonymous.text
    assert "/hub/login" in requests.get(page_url, timeout=30).url
