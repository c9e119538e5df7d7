"""Real private training on the breast-cancer data, charged to a real ledger service over its socket."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant
from torch import nn
from torch.utils.data import DataLoader

import paitient
from paitient import dp
from paitient.channel import call
from paitient.kernel.dp.validate import DPModelError
from tests import workspacegroup

from .conftest import mlp, register

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", workspacegroup.setpriv_groups()]


def train(run, epochs=None):
    for _ in range(epochs or run.epochs):
        for x, y in run.data_loader:
            run.optimizer.zero_grad()
            run.criterion(run.model(x), y).backward()
            run.optimizer.step()


def private(model, loader, site, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=kw.pop("lr", 0.5))
    args = dict(
        target_epsilon=1.0,
        epochs=3,
        max_grad_norm=1.0,
        project="oncology",
        dataset="breast_cancer",
        criterion=nn.CrossEntropyLoss(),
        run_dir=site.run_dir,
        progress=False,
        noise_generator=torch.Generator().manual_seed(0),
    )
    args.update(kw)
    return dp.make_private(model, opt, loader, **args)


def test_training_settles_with_the_accountants_epsilon(service, site, member, loader, cancer, world_tmp):
    torch.manual_seed(0)
    run = private(mlp(), loader, site)
    assert run.mode == "fast" and "every trainable layer is nn.Linear or a normalisation" in run.mode_reason
    row = service.ledger.run(run.reservation)
    assert row["state"] == "reserved" and row["epsilon"] == 1.0 and row["username"] == "alice"
    train(run)
    assert run.finished and run.steps == 3 * len(loader)
    # the epsilon in the ledger is the PRV accountant's for (noise multiplier, sample rate, steps)
    acc = PRVAccountant()
    acc.history = [(run.noise_multiplier, 1 / len(loader), run.steps)]
    row = service.ledger.run(run.reservation)
    assert row["state"] == "settled"
    assert row["epsilon_spent"] == acc.get_epsilon(delta=run.target_delta) == row["record"]["epsilon"]
    assert 0.9 < row["epsilon_spent"] <= 1.0 and row["delta_spent"] == run.target_delta
    rec = row["record"]
    assert rec["steps"] == run.steps and rec["sample_rate"] == 1 / len(loader) and rec["mode"] == "fast"
    assert rec["max_grad_norm"] == 1.0 and rec["noise_multiplier"] == run.noise_multiplier
    assert rec["dataset"] == "breast_cancer" and rec["accountant"] == "prv"
    # default delta: a tenth of the dataset's total delta, below 1/(10 n)
    assert run.target_delta == min(1e-5 / 10, 1 / (10 * len(cancer)))
    # the saved weights are matched to this run through their SHA-256
    path = world_tmp / "model.safetensors"
    digest = dp.save_weights(run.model, path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == rec["weights_sha256"]
    assert service.ledger.record_by_hash(digest)["id"] == run.reservation
    assert call(site.run_dir / "ledger.sock", "record_by_hash", {"sha256": digest})["id"] == run.reservation
    # and it learnt something despite epsilon 1
    x, y = cancer.tensors
    with torch.no_grad():
        acc_train = (run.model(x).argmax(1) == y).float().mean().item()
    assert acc_train > 0.85


def test_noise_multiplier_and_epsilon_identical_to_opacus(loader):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(accountant="prv")
    _, popt, ploader = engine.make_private_with_epsilon(
        module=model,
        optimizer=opt,
        data_loader=loader,
        target_epsilon=2.0,
        target_delta=1e-6,
        epochs=4,
        max_grad_norm=1.0,
    )
    from opacus.accountants.utils import get_noise_multiplier

    ours = get_noise_multiplier(
        target_epsilon=2.0, target_delta=1e-6, sample_rate=1 / len(loader), steps=4 * len(loader), accountant="prv"
    )  # as make_private computes it
    assert ours == popt.noise_multiplier
    for _ in range(5):  # Opacus' own accountant after 5 steps agrees with the one we build from the numbers
        engine.accountant.step(noise_multiplier=popt.noise_multiplier, sample_rate=1 / len(loader))
    acc = PRVAccountant()
    for _ in range(5):
        acc.step(noise_multiplier=ours, sample_rate=1 / len(loader))
    assert acc.get_epsilon(delta=1e-6) == engine.accountant.get_epsilon(delta=1e-6)


def test_budget_refused_when_exhausted(service, site, member, loader):
    first = private(mlp(), loader, site, dataset="gbsg2", target_epsilon=1.5)  # gbsg2's total is 2.0
    train(first)
    spent = service.ledger.run(first.reservation)["epsilon_spent"]
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(dp.BudgetExceeded) as e:
        private(model, loader, site, dataset="gbsg2", target_epsilon=1.0)
    assert f"epsilon 1 asked, but oncology/gbsg2 has {2.0 - spent:g} left of 2" in str(e.value)
    assert len(service.ledger.runs("oncology", "gbsg2")) == 1
    for b, p in zip(before, model.parameters(), strict=True):  # nothing was trained
        assert torch.equal(b, p.detach())


def test_steps_beyond_reservation_and_after_settling_are_refused(service, site, member, loader):
    run = private(mlp(), loader, site, epochs=1)
    x, y = next(iter(loader))
    for _ in range(len(loader)):
        run.optimizer.zero_grad()
        run.criterion(run.model(x), y).backward()
        run.optimizer.step()
    with pytest.raises(dp.RunFinished, match=f"taken all {len(loader)} steps it reserved"):
        run.optimizer.step()
    run.finish()
    with pytest.raises(dp.RunFinished, match="has settled"):
        run.optimizer.step()
    assert run.finish() is run.record  # idempotent


def test_with_block_settles_what_was_spent(service, site, member, loader):
    with pytest.raises(KeyboardInterrupt):
        with private(mlp(), loader, site, epochs=5) as run:
            for i, (x, y) in enumerate(run.data_loader):
                run.optimizer.zero_grad()
                run.criterion(run.model(x), y).backward()
                run.optimizer.step()
                if i == 3:
                    raise KeyboardInterrupt
    row = service.ledger.run(run.reservation)
    assert row["state"] == "settled" and row["record"]["steps"] == 4
    assert 0 < row["epsilon_spent"] < 1.0 and row["epsilon_spent"] == run.epsilon


def test_unused_run_releases_everything(service, site, member, loader):
    run = private(mlp(), loader, site)
    run.finish()
    row = service.ledger.run(run.reservation)
    assert (row["epsilon_spent"], row["delta_spent"]) == (0.0, 0.0)


def test_invalid_model_explained_and_nothing_reserved(service, site, member, loader):
    model = nn.Sequential(nn.Linear(30, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    with pytest.raises(DPModelError) as e:
        private(model, loader, site)
    msg = str(e.value)
    assert "layer '1' (BatchNorm1d(16))" in msg
    assert "nn.LayerNorm(16) or nn.GroupNorm(8, 16)" in msg and "not GroupNorm(16, 16)" in msg
    assert isinstance(model[1], nn.BatchNorm1d)  # never changed behind the user's back
    assert service.ledger.runs() == []
    lstm = nn.Sequential(nn.LSTM(30, 8))
    with pytest.raises(DPModelError, match="opacus.layers.DPLSTM"):
        private(lstm, loader, site)


def test_unusable_loaders_and_arguments_are_explained(service, site, member, cancer, loader):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(cancer)

    with pytest.raises(ValueError, match="use a map-style dataset"):
        private(mlp(), DataLoader(Stream(), batch_size=8), site)
    with pytest.raises(ValueError, match="must be a torch DataLoader"):
        private(mlp(), [next(iter(loader))], site)
    with pytest.raises(ValueError, match="target_epsilon must be a positive number"):
        private(mlp(), loader, site, target_epsilon=0)
    with pytest.raises(ValueError, match="max_grad_norm must be a positive number"):
        private(mlp(), loader, site, max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="project 'oncology' has no dataset 'diabetes'"):
        private(mlp(), loader, site, dataset="diabetes")
    assert service.ledger.runs() == []


def test_the_auto_fix_we_refuse_gives_a_dead_layer():
    """Why paitient explains instead of fixing: GroupNorm(C, C) on (N, C) input outputs its bias alone."""
    gn = nn.GroupNorm(16, 16)
    with torch.no_grad():
        gn.bias.copy_(torch.arange(16.0))
    out = gn(torch.randn(100, 16) * 5 + 3)
    torch.testing.assert_close(out, torch.arange(16.0).expand(100, 16), atol=1e-3, rtol=0)


class Embedded(nn.Module):
    """A categorical feature (tumour size bin) through an embedding, the rest through a linear layer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(8, 4)
        self.lin = nn.Linear(30 + 4, 2)

    def forward(self, x):
        bins = (x[:, 0] * 2 + 4).clamp(0, 7).long()
        return self.lin(torch.cat([x, self.emb(bins)], 1))


@pytest.mark.parametrize(
    "model_fn, criterion, mode",
    [
        (Embedded, nn.CrossEntropyLoss(), "ghost"),
        (Embedded, None, "hooks"),
        (
            lambda: nn.Sequential(
                nn.Unflatten(1, (1, 30)), nn.Conv1d(1, 4, 3), nn.Flatten(), nn.ReLU(), nn.Linear(4 * 28, 2)
            ),
            nn.CrossEntropyLoss(),
            "hooks",
        ),
    ],
)
def test_other_models_train_through_opacus(service, site, member, loader, model_fn, criterion, mode):
    run = private(model_fn(), loader, site, criterion=criterion, epochs=1)
    assert run.mode == mode, run.mode_reason
    crit = run.criterion if run.criterion is not None else nn.CrossEntropyLoss()
    for x, y in run.data_loader:
        run.optimizer.zero_grad()
        crit(run.model(x), y).backward()
        run.optimizer.step()
    assert run.finished
    row = service.ledger.run(run.reservation)
    acc = PRVAccountant()
    acc.history = [(run.noise_multiplier, run.sample_rate, len(loader))]
    assert row["epsilon_spent"] == acc.get_epsilon(delta=run.target_delta) and row["record"]["mode"] == mode
    assert row["record"]["weights_sha256"] == dp.weights_sha256(run.model)


def test_normalised_mlp_trains_in_the_fast_mode(service, site, member, loader):
    model = nn.Sequential(nn.Linear(30, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 2))
    run = private(model, loader, site, epochs=2)
    assert run.mode == "fast"
    train(run)
    row = service.ledger.run(run.reservation)
    assert row["state"] == "settled" and row["record"]["mode"] == "fast" and row["epsilon_spent"] <= 1.0
    assert model[1].weight.grad is not None  # the LayerNorm was trained too
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_poisson_empty_batches_are_handled(service, site, member, cancer):
    loader = DataLoader(cancer, batch_size=1)  # sample rate 1/569: about a third of the batches are empty
    run = private(nn.Sequential(nn.Linear(30, 2)), loader, site, epochs=1, lr=0.05)
    sizes = []
    for x, y in run.data_loader:
        sizes.append(len(x))
        run.optimizer.zero_grad()
        run.criterion(run.model(x), y).backward()
        run.optimizer.step()
    assert len(sizes) == 569 and sizes.count(0) > 100
    assert run.finished and run.record["record"]["steps"] == 569
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


KERNEL = """
import sys, time, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from sklearn.datasets import load_breast_cancer
from sklearn.preprocessing import StandardScaler
from paitient import dp
x, y = load_breast_cancer(return_X_y=True)
ds = TensorDataset(torch.tensor(StandardScaler().fit_transform(x), dtype=torch.float32), torch.tensor(y))
model = nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))
run = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), DataLoader(ds, batch_size=64),
                      target_epsilon={eps}, epochs=3, max_grad_norm=1.0, project="oncology",
                      dataset="breast_cancer", criterion=nn.CrossEntropyLoss(), progress=False)
print("RESERVED", run.reservation, flush=True)
for epoch in range(run.epochs):
    for xb, yb in run.data_loader:
        run.optimizer.zero_grad()
        run.criterion(run.model(xb), yb).backward()
        run.optimizer.step()
        time.sleep({pause})
print("SETTLED", run.record["epsilon_spent"], run.record["username"], flush=True)
"""


def test_kernel_killed_mid_training_counts_its_reservation(service, site, member):
    env = {**os.environ, "PAITIENT_RUN_DIR": str(site.run_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-c", KERNEL.format(eps=2.5, pause=0.5)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("RESERVED"), line
        rid = line.split()[1]
        time.sleep(1.0)  # a few steps in
        assert service.ledger.run(rid)["state"] == "reserved"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    budget = call(site.run_dir / "ledger.sock", "budget", {"project": "oncology"})
    bc = {r["dataset"]: r for r in budget["projects"]["oncology"]}["breast_cancer"]
    assert (bc["epsilon_spent"], bc["epsilon_reserved"]) == (2.5, 0.0)
    assert service.ledger.run(rid)["state"] == "lost"


def test_training_as_another_uid_is_charged_to_that_user(service, site, state_dir):
    """The kernel needs only PAITIENT_RUN_DIR and the socket; the ledger names it from its uid."""
    register(state_dir, "nobody-researcher", 65534, ("oncology",))
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/nonexistent",
        "PAITIENT_RUN_DIR": str(site.run_dir),
        "PYTHONDONTWRITEBYTECODE": "1",
        "MPLCONFIGDIR": "/tmp",
    }
    out = subprocess.run(
        [*NOBODY, sys.executable, "-c", KERNEL.format(eps=1.0, pause=0)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    rid = lines["RESERVED"].strip()
    eps, user = lines["SETTLED"].split()
    row = service.ledger.run(rid)
    assert row["username"] == user == "nobody-researcher" and row["state"] == "settled"
    assert row["epsilon_spent"] == float(eps) <= 1.0
    assert json.dumps(row["record"])  # the record arrived whole


def test_kernel_in_a_pid_namespace_is_tracked_by_its_host_pid(service, site, state_dir):
    """Kernels run in bubblewrap with their own pid and network namespaces: the ledger sees the host pid
    (SO_PEERCRED), so a sandboxed kernel killed mid-training is found dead and its reservation counted."""
    register(state_dir, "nobody-researcher", 65534, ("oncology",))
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PAITIENT_RUN_DIR": str(site.run_dir), "MPLCONFIGDIR": "/tmp"}
    source = str(Path(paitient.__file__).resolve().parents[1])  # a checkout under /tmp must stay visible
    sandbox = [
        "bwrap",
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--tmpfs",
        "/tmp",
        "--ro-bind",
        source,
        source,
        "--ro-bind",
        str(site.run_dir),
        str(site.run_dir),
        "--unshare-pid",
        "--unshare-net",
        "--die-with-parent",
        "--new-session",
        "--",
    ]
    proc = subprocess.Popen(
        [*NOBODY, *sandbox, sys.executable, "-c", KERNEL.format(eps=1.5, pause=0.5)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("RESERVED"), line + proc.stderr.read()[-3000:]
        row = service.ledger.run(line.split()[1])
        status = open(f"/proc/{row['pid']}/status").read()
        nspid = next(x for x in status.splitlines() if x.startswith("NSpid:")).split()[1:]
        assert len(nspid) == 2 and int(nspid[0]) == row["pid"] and int(nspid[1]) < 10  # host pid, sandbox pid
        assert row["username"] == "nobody-researcher" and row["state"] == "reserved"
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # bwrap; --die-with-parent takes the kernel with it
        proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while service.ledger.run(row["id"])["state"] == "reserved" and time.monotonic() < deadline:
        call(site.run_dir / "ledger.sock", "budget", {})  # each question sweeps for dead reservers
        time.sleep(0.1)
    after = service.ledger.run(row["id"])
    assert after["state"] == "lost"
    bc = {r["dataset"]: r for r in service.ledger.budget("oncology")}["breast_cancer"]
    assert bc["epsilon_spent"] == 1.5 and bc["epsilon_reserved"] == 0.0
