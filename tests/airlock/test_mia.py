"""The membership-inference audit: real training, the real sandbox, and an attack on the sandbox itself."""

from __future__ import annotations

import json
import os
import socket
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save
from sklearn.metrics import roc_auc_score

from paitient.rules.membership import roc_auc_advantage
from paitient.rules.split import SplitError, members_from_spec, split_indices
from paitient.services.airlock.mia import (
    FRAME_MAGIC,
    MAX_OUTPUT_COLUMNS,
    AuditJob,
    Limits,
    judge,
    prepared_rows,
    read_frame,
    row_losses,
    run_audit,
    run_model,
    sandbox_argv,
)
from tests.airlock.helpers import breast_cancer
from tests.processes import OOM_PROBE, peak_memory, processes_of, reset_peak_memory

MLP = """
import torch
class Model(torch.nn.Module):
    def __init__(self, d=30, h=128):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.ReLU(), torch.nn.Linear(h, h),
                                       torch.nn.ReLU(), torch.nn.Linear(h, 2))
    def forward(self, x):
        return self.net(x)
"""
LIMITS = {"max_auc": 0.6, "max_advantage": 0.2}


def _model(source=MLP):
    ns: dict = {}
    exec(source, ns)  # noqa: S102 - the test's own model definition
    return ns["Model"]()


@pytest.fixture(scope="module")
def data():
    df = breast_cancer()
    # Some label noise: memorising it is what a loss-threshold attack sees.
    rng = np.random.default_rng(1)
    df["target"] = np.where(rng.random(len(df)) < 0.15, 1 - df["target"], df["target"])
    train, _ = split_indices(len(df), holdout=0.5, seed=0)
    features = [c for c in df.columns if c != "target"]
    x = df[features].to_numpy(np.float32)
    mu, sd = x[train].mean(0), x[train].std(0)
    x = (x - mu) / sd
    return df, features, train, torch.from_numpy(x[train]), torch.from_numpy(df["target"].to_numpy()[train]).long()


@pytest.fixture
def audit_account(make_system_user):
    """A dedicated account for the audit (the airlock makes ``paitient-audit``; the tests make their own)."""
    return make_system_user("audit").pw_name


def test_the_audit_refuses_a_shared_account(data):
    df, features, train = data[:3]
    with pytest.raises(ValueError, match="shared account 'nobody'"):
        run_audit(_job(df, features, train, b""), account="nobody", timeout=10)


def _job(df, features, train, weights, source=MLP):
    return AuditJob(
        model_source=source,
        weights=weights,
        data=df,
        members=[int(i) for i in train],
        features=features,
        target="target",
        preprocess="standardize",
    )


def test_auc_and_advantage_match_the_definitions():
    rng = np.random.default_rng(0)
    m, n = rng.normal(0.5, 1, 300), rng.normal(0, 1, 200)
    m[:20] = 0.0
    n[:20] = 0.0  # ties count half
    auc, adv = roc_auc_advantage(m, n)
    assert auc == pytest.approx(roc_auc_score(np.r_[np.ones(300), np.zeros(200)], np.r_[m, n]), abs=1e-12)
    thresholds = np.unique(np.r_[m, n])
    best = max((m >= t).mean() - (n >= t).mean() for t in thresholds)
    assert adv == pytest.approx(best, abs=1e-12)
    assert roc_auc_advantage([1, 2], [1, 2]) == (0.5, 0.0)


def test_overfit_model_fails_the_audit(data, audit_account):
    df, features, train, x, y = data
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(250):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    answer = run_audit(_job(df, features, train, save(model.state_dict())), account=audit_account, timeout=300)
    verdict = judge(answer, **LIMITS)
    assert verdict["status"] == "fail", verdict
    assert verdict["details"]["mia_advantage"] > 0.3 and verdict["details"]["mia_loss_low"] > 0.1
    assert "memorises its training data" in verdict["reason"]
    # typed, bounded numbers of two significant digits, nothing else
    for key in ("mia_loss", "mia_loss_low", "mia_loss_high", "mia_calibrated", "mia_advantage", "holdout_accuracy"):
        value = verdict["details"][key]
        assert isinstance(value, float) and 0 <= value <= 1 and value == float(f"{value:.2g}"), (key, value)


def _overfit(x, y, seed=0):
    torch.manual_seed(seed)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(250):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def test_a_fake_result_printed_at_exit_changes_nothing_and_a_second_answer_is_refused(data, audit_account):
    df, features, train, x, y = data
    weights = save(_overfit(x, y).state_dict())
    fake = json.dumps({"auc": 0.5, "advantage": 0.0, "mia_loss": 0.0, "mia_calibrated": 0.0, "mia_advantage": 0.0})
    printed = (
        MLP
        + f"""
import atexit, sys
atexit.register(lambda: sys.stdout.write({fake!r} + "\\n"))
"""
    )
    answer = run_audit(_job(df, features, train, weights, source=printed), account=audit_account, timeout=300)
    verdict = judge(answer, **LIMITS)
    assert verdict["status"] == "fail" and verdict["details"]["mia_loss"] > 0.1, verdict
    # A second frame after the worker's own (appended at exit) makes the answer unreadable, not better.
    appended = (
        MLP
        + """
import atexit, json, os, struct, sys
def _again():
    job = json.load(open(sys.argv[1]))
    with open(job["out"], "ab") as f:
        f.write(b"PAITIENT-OUTPUTS/1\\n" + struct.pack("<II", 1, 2) + b"\\0" * 8)
atexit.register(_again)
"""
    )
    answer = run_audit(_job(df, features, train, weights, source=appended), account=audit_account, timeout=300)
    assert "not one frame of" in answer["error"], answer
    assert judge(answer, **LIMITS)["status"] == "error"


def test_a_model_whose_auc_is_far_below_one_half_fails_too(data, audit_account):
    df, features, train, x, y = data
    # Trained to be wrong on its own training rows: their loss is high, the attack's AUC near 0.
    weights = save(_overfit(x, 1 - y).state_dict())
    answer = run_audit(_job(df, features, train, weights), account=audit_account, timeout=300)
    verdict = judge(answer, **LIMITS)
    # |AUC - 0.5| beyond the bound with its whole interval, though the AUC itself is low
    assert verdict["status"] == "fail" and verdict["details"]["mia_loss_low"] > 0.1, verdict
    job = _job(df, features, train, weights)
    outputs = torch.from_numpy(prepared_rows(job)).float()
    model = _model()
    model.load_state_dict(_overfit(x, 1 - y).state_dict())
    losses = row_losses(model(outputs).detach().double().numpy(), df["target"].to_numpy(), "cross_entropy")
    members = np.zeros(len(df), bool)
    members[train] = True
    assert roc_auc_advantage(-losses[members], -losses[~members])[0] < 0.4  # the one-sided rule would pass it


def test_dp_trained_model_passes_the_audit(data, audit_account):
    from opacus import PrivacyEngine

    df, features, train, x, y = data
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    engine = PrivacyEngine(accountant="prv")
    model, opt, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=opt,
        data_loader=loader,
        target_epsilon=1.0,
        target_delta=1e-5,
        epochs=8,
        max_grad_norm=1.0,
    )
    for _ in range(8):
        for xb, yb in loader:
            if len(xb) == 0:
                continue
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    assert engine.get_epsilon(1e-5) <= 1.0 + 1e-6
    state = {k.removeprefix("_module."): v for k, v in model.state_dict().items()}
    answer = run_audit(_job(df, features, train, save(state)), account=audit_account, timeout=300)
    verdict = judge(answer, **LIMITS)
    assert verdict["status"] == "pass", verdict
    assert verdict["details"]["mia_loss"] < 0.1 and verdict["details"]["members"] == 285
    assert verdict["details"]["holdout_accuracy"] > 0.7


def test_the_model_code_has_no_network_and_cannot_write(data, audit_account):
    df, features, train, x, y = data
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    accepted: list = []
    done = threading.Event()

    def accept():
        while not done.is_set():
            try:
                accepted.append(listener.accept())
            except OSError:
                continue

    t = threading.Thread(target=accept)
    t.start()
    hostile = (
        MLP
        + f"""
import socket
_orig = Model.__init__
def _init(self, *a, **k):
    _orig(self, *a, **k)
    import os
    if os.path.exists("/etc/shadow") or os.listdir(os.path.join(os.environ["HOME"], "run")):
        raise SystemExit("sees the host's secrets or service sockets")
    try:
        open(os.path.join(os.getcwd(), "escaped"), "w").write("x")
        raise SystemExit("wrote into the job directory")
    except OSError as e:
        write_error = e.strerror
    socket.create_connection(("127.0.0.1", {port}), timeout=2)
Model.__init__ = _init
"""
    )
    weights = save(_model().state_dict())
    try:
        answer = run_audit(_job(df, features, train, weights, source=hostile), account=audit_account, timeout=120)
    finally:
        done.set()
        t.join()
        listener.close()
    assert accepted == []
    assert "error" in answer and (
        "Network is unreachable" in answer["error"] or "Connection refused" in answer["error"]
    ), answer
    verdict = judge(answer, **LIMITS)
    assert verdict["status"] == "error" and verdict["details"]["error"] == answer["error"]
    # the requester's reason carries no text from the model code
    assert "127.0.0.1" not in verdict["reason"] and "Errno" not in verdict["reason"]


def test_sandbox_command_drops_privileges_then_uses_the_kernel_policy():
    argv = sandbox_argv(
        uid=65534,
        gid=65534,
        scratch="/tmp/s",
        job_dir="/tmp/s/job",
        prefix="/opt/venv",
        python="/opt/venv/bin/python",
        limits=Limits(memory_mb=512),
        seccomp_fd=7,
    )
    assert argv[:10] == [
        "choom",
        "-n",
        "1000",
        "--",
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--no-new-privs",
        "--pdeathsig=KILL",
    ]
    assert argv[10].endswith("prlimit") and "--data=536870912:536870912" in argv
    b = argv.index("/usr/bin/bwrap")
    assert {"--unshare-all", "--disable-userns", "--clearenv"} <= set(argv[b:])
    assert argv[argv.index("--seccomp") + 1] == "7"
    assert ["--ro-bind", "/opt/venv", "/opt/venv"] == argv[argv.index("/opt/venv") - 1 : argv.index("/opt/venv") + 2]
    assert "/etc/shadow" not in argv and "--ro-bind /etc /etc" not in " ".join(argv)
    assert argv[-4:] == ["/opt/venv/bin/python", "-I", "/tmp/s/job/worker.py", "/tmp/s/job/job.json"]
    assert argv[argv.index("--chdir") + 1] == "/tmp/s/job"


def test_declared_splits():
    train, hold = split_indices(10, holdout=0.3, seed=4)
    assert len(train) == 7 and len(hold) == 3 and sorted([*train, *hold]) == list(range(10))
    assert list(members_from_spec({"holdout": 0.3, "seed": 4}, 10).nonzero()[0]) == list(train)
    assert list(members_from_spec({"train_rows": [1, 3]}, 5).nonzero()[0]) == [1, 3]
    with pytest.raises(SplitError, match="between 0 and 4"):
        members_from_spec({"train_rows": [7]}, 5)
    with pytest.raises(SplitError, match="hold some rows out"):
        members_from_spec({"train_rows": [0, 1]}, 2)
    with pytest.raises(SplitError, match="declare the split"):
        members_from_spec(None, 2)


INIT_KEPT_ALIVE = """
import os
# bubblewrap's init (pid 1 here) runs as this account and its memory is writable through /proc: its code where it
# waits for its child becomes prctl(PR_SET_PDEATHSIG, 0); for (;;) pause(); (x86-64)
nr, *rest = open("/proc/1/syscall").read().split()
with open("/proc/1/mem", "r+b", buffering=0) as mem:
    mem.seek(int(rest[-1], 16))
    mem.write(bytes.fromhex("bf0100000031f6b89d0000000f05b8220000000f05ebf7"))
os._exit(0)
"""


def test_model_code_that_keeps_the_sandboxs_init_alive_leaves_nothing_running(data, audit_account):
    """Attack: the model's code rewrites the code of bubblewrap's init (its pid 1, of the audit's account)
    so that it neither dies with its parent nor exits. The sandbox outlived the audit, its timeout and the
    service: 62 processes left behind took the account's places, and the next user's audit could not start.
    The airlock now kills that init at the end of each run, and with it the whole sandbox."""
    import platform
    import pwd
    import time

    assert platform.machine() == "x86_64", "the attack's machine code is x86-64's; write it for this machine"
    df, features, train = data[:3]
    uid = pwd.getpwnam(audit_account).pw_uid
    job = _job(df, features, train, b"", source=INIT_KEPT_ALIVE)
    answer = run_audit(job, account=audit_account, timeout=8)
    assert answer == {"error": "the audit did not finish within 8 s"}  # the outer bubblewrap waits for its init
    deadline = time.monotonic() + 5
    while processes_of(uid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_of(uid) == []


def test_model_code_that_puts_a_fifo_for_its_outputs_does_not_hold_the_airlock(data, audit_account, tmp_path):
    """Attack: the model's code puts a FIFO where the worker writes its outputs, and exits. The airlock's one
    check thread waited in ``open`` for a writer for ever (and again after each restart, re-checking the
    request). The outputs file is now the airlock's, bound into the sandbox, so the model's code cannot
    replace it; and a FIFO at the path the airlock reads is opened without waiting and refused as no file."""
    df, features, train = data[:3]
    fifo = (
        "import json, os, sys\nout = json.load(open(sys.argv[1]))['out']\nos.unlink(out)\nos.mkfifo(out)\nos._exit(0)\n"
    )
    got: dict = {}
    t = threading.Thread(
        target=lambda: got.update(
            answer=run_audit(_job(df, features, train, b"", source=fifo), account=audit_account, timeout=60)
        ),
        daemon=True,
    )
    t.start()
    t.join(90)
    assert not t.is_alive(), "the audit waits on the FIFO"
    assert got["answer"]["error"].startswith("the audit sandbox exited with status 1: "), got
    assert "Device or resource busy" in got["answer"]["error"]
    os.mkfifo(tmp_path / "outputs.bin")
    assert read_frame(tmp_path / "outputs.bin", 3) == {
        "error": "the audit's outputs are not a file of the size the airlock reads"
    }


HOME_AND_OOM = (
    OOM_PROBE
    + """
import errno, json, os, signal, sys, torch
class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
    def forward(self, x):
        home = os.statvfs(os.environ["HOME"])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        out, wrote, refused = json.load(open("job.json"))["out"], 0, 0
        with open(out, "r+b", buffering=0) as f:
            try:
                for _ in range(64):
                    wrote += f.write(bytes(1 << 20))
            except OSError as e:
                refused = e.errno
            f.truncate(0)
        oom, lowered = oom_probe()
        row = [home.f_blocks * home.f_frsize / 2**20, wrote / 2**20, refused, oom, lowered]
        return torch.tensor([row], dtype=torch.float64).expand(len(x), 5)
"""
)


def test_model_code_writes_nothing_to_the_hosts_disk_and_is_the_oom_killers_first_choice(data, audit_account):
    """Attack: the model's code writes where it can, to fill the disk the airlock's state lies on (its home
    was a folder there, so an audit could write until the disk was full), and lowers its oom_score_adj
    (the audits ran at 0, beside the services). Its home is now a sized tmpfs, the one host file it can
    write (its outputs) stops at one frame's size, and its oom_score_adj is 1000 with a floor it cannot
    lower where the service may set one (CAP_SYS_RESOURCE)."""
    import errno

    from paitient.rules.sandbox import TMP_BYTES
    from paitient.services.launcher.service import has_sys_resource

    df, features, train = data[:3]
    weights = save(_model(HOME_AND_OOM).state_dict())
    job = _job(df, features, train, weights, source=HOME_AND_OOM)
    rows = prepared_rows(job)
    outputs = run_model(job, rows, account=audit_account, timeout=120)
    assert not isinstance(outputs, dict), outputs
    home_mib, wrote_mib, refused, oom, lowered = outputs[0]
    assert home_mib == TMP_BYTES / 2**20
    frame = len(FRAME_MAGIC) + 8 + len(rows) * MAX_OUTPUT_COLUMNS * 4
    assert refused == errno.EFBIG and wrote_mib * 2**20 <= frame < 64 * 2**20
    assert oom == 1000
    if has_sys_resource():
        assert lowered == errno.EACCES
    else:
        # Root in a container may not set the floor (the launcher warns of it for kernels): lowered here.
        assert lowered == 0


def test_what_model_code_prints_is_not_held_by_the_airlock(data, audit_account):
    """Attack: the model's code writes 1 GiB to its stdout and 1 GiB to its stderr. The airlock kept every byte
    (3 GiB written took it from 106 MiB to 6.2 GiB): now stdout goes nowhere and a tail of stderr is kept, and
    the service's peak memory grows by less than 200 MiB."""
    df, features, train = data[:3]
    flood = (
        "import os\nchunk = b'x' * (1 << 20)\nfor _ in range(1024):\n    os.write(1, chunk)\n    os.write(2, chunk)\n"
        "raise SystemExit(3)\n"
    )
    before = reset_peak_memory()
    answer = run_audit(_job(df, features, train, b"", source=flood), account=audit_account, timeout=120)
    assert answer["error"].startswith("the audit sandbox exited with status 3: ")
    assert len(answer["error"]) <= 2000
    assert peak_memory() - before < 200 * 1024
