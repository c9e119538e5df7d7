"""The registry of pretrained checkpoints: what it takes and refuses, the operator's commands on a real state
folder, who can write it, and jobs that start from a checkpoint in the real runner."""

import io
import json
import os
import pickle
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load as load_weights
from safetensors.torch import save, save_file
from torch import nn

from paitient.services.jobs import checkpoints as ck
from tests.jobs import test_runner


def linear_state(out: int = 2, dtype=torch.float32, seed: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight, bias = torch.randn(out, 30, generator=gen), torch.randn(out, generator=gen)
    return {"0.weight": weight.to(dtype), "0.bias": bias.to(dtype)}


# -- the file format ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_tensors_are_read_as_float32_with_their_values(dtype):
    state = linear_state(dtype=dtype)
    values = ck.parse(save(state))
    assert {k: (v.dtype.name, v.shape) for k, v in values.items()} == {
        "0.weight": ("float32", (2, 30)),
        "0.bias": ("float32", (2,)),
    }
    for name, tensor in state.items():
        assert torch.equal(torch.from_numpy(values[name]), tensor.float())


def test_a_pickle_is_refused_and_never_loaded():
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch /tmp/paitient-checkpoint-unpickled",))

    buffer = io.BytesIO()
    torch.save(linear_state(), buffer)  # a zip of pickles, as .pt and .bin files are
    for data in (buffer.getvalue(), pickle.dumps(Boom(), protocol=4), pickle.dumps(Boom(), protocol=2)):
        with pytest.raises(ck.CheckpointRefused, match=r"this is a pickle .* safetensors only and never unpickles"):
            ck.parse(data)
    assert not os.path.exists("/tmp/paitient-checkpoint-unpickled")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"weights, as text", r"not a safetensors file .* safetensors.torch.save_file"),
        (b"", "not a safetensors file"),
        ((10).to_bytes(8, "little") + b"{not json}", "header is not JSON"),
        ((2).to_bytes(8, "little") + b"{}", "holds no tensor"),
    ],
)
def test_what_is_not_safetensors_is_refused(data, message):
    with pytest.raises(ck.CheckpointRefused, match=message):
        ck.parse(data)


def raw_file(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


@pytest.mark.parametrize(
    ("header", "body", "message"),
    [
        ({"w": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, "is I64; parameters are float32"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "do not hold a F32 tensor"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "take 4 bytes and the file holds 8"),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            },
            b"\0" * 4,
            "overlap or leave a gap",
        ),
        ({"__x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "not a parameter name"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, b"\0" * 4, "exactly dtype, shape"),
    ],
)
def test_a_damaged_or_foreign_header_is_refused(header, body, message):
    with pytest.raises(ck.CheckpointRefused, match=message):
        ck.parse(raw_file(header, body))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nan_or_infinite_values_are_refused(bad, dtype):
    state = linear_state(dtype=dtype)
    state["0.weight"][1, 3] = bad
    with pytest.raises(ck.CheckpointRefused, match=r"tensor '0.weight' holds 1 NaN or infinite value\(s\)"):
        ck.parse(save(state))


def test_more_values_than_the_runner_trains_are_refused():
    with pytest.raises(ck.CheckpointRefused, match="more than 50 values"):
        ck.parse(save(linear_state()), max_values=50)


def test_match_names_every_difference():
    graph = {"0.weight": ((4, 30), torch.float32), "0.bias": ((4,), torch.float32), "2.weight": ((2, 4), None)}
    ck.match({"0.weight": (4, 30), "0.bias": (4,), "2.weight": (2, 4)}, graph)  # the same: no error
    with pytest.raises(ck.CheckpointRefused) as e:
        ck.match({"0.weight": (2, 30), "0.bias": (4,), "1.weight": (2, 4)}, graph)
    message = str(e.value)
    assert "the model has 2.weight and the checkpoint does not" in message
    assert "the checkpoint has 1.weight and the model does not" in message
    assert "0.weight is [4, 30] in the model, [2, 30] in the checkpoint" in message
    assert "paitient.jobs.checkpoints() lists them" in message


# -- the operator's commands -------------------------------------------------------------------------------


@pytest.fixture
def state(tmp_path):
    return tmp_path / "state"


def cli(state, *args):
    return subprocess.run(
        [sys.executable, "-m", "paitient.cli", "jobs", "checkpoints", *args, f"--state-dir={state}"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_add_list_remove_as_root(state, tmp_path):
    state_file = tmp_path / "mlp.safetensors"
    save_file(linear_state(dtype=torch.float16), str(state_file))
    data = state_file.read_bytes()
    import hashlib

    sha256 = hashlib.sha256(data).hexdigest()
    out = cli(
        state,
        "add",
        str(state_file),
        "--name=mlp-public",
        "--description=logistic regression pretrained on public data",
        "--source=made for the tests; CC0-1.0",
        "--added-by=olivia",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"added mlp-public: {sha256}, 2 tensors, {len(data)} bytes")

    folder = state / "jobs" / "checkpoints"
    kept = folder / f"{sha256}.safetensors"
    assert kept.read_bytes() == data
    assert (mode(kept), kept.stat().st_uid, mode(folder), folder.stat().st_uid) == (0o444, 0, 0o700, 0)
    assert mode(folder / "index.json") == 0o444 and mode(state / "jobs") == 0o700
    index = json.loads((folder / "index.json").read_text())
    entry = index["checkpoints"]["mlp-public"]
    assert index["format"] == ck.FORMAT and entry["sha256"] == sha256 and entry["added_by"] == "olivia"
    assert entry["parameters"] == {"0.weight": [2, 30], "0.bias": [2]} and entry["source"].endswith("CC0-1.0")
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]  # nothing half-written left

    out = cli(state, "list")
    assert out.returncode == 0 and f"mlp-public  {sha256}  2 tensors, 62 values" in out.stdout
    assert "source: made for the tests; CC0-1.0" in out.stdout

    out = cli(state, "add", str(state_file), "--name=mlp-public", "--description=again", "--source=again")
    assert out.returncode == 2 and "already named 'mlp-public'; remove it first" in out.stderr
    out = cli(state, "add", str(state_file), "--name=other", "--description=again", "--source=again")
    assert out.returncode == 2 and "already in the registry as 'mlp-public'" in out.stderr

    out = cli(state, "remove", "mlp-public")
    assert out.returncode == 0 and out.stdout.strip() == f"removed mlp-public ({sha256})"
    assert not kept.exists() and json.loads((folder / "index.json").read_text())["checkpoints"] == {}
    out = cli(state, "list")
    assert out.returncode == 0 and out.stdout.startswith("no checkpoints (add one:")
    out = cli(state, "remove", "mlp-public")
    assert out.returncode == 2 and "there is no checkpoint 'mlp-public' in the registry (it holds: none)" in out.stderr

    audit = (state / "audit").glob("*")
    text = "".join(p.read_text() for p in audit if p.is_file() and p.suffix in (".jsonl", ""))
    assert '"action":"jobs.checkpoint.add"' in text.replace(" ", "") and sha256 in text


def test_add_refuses_bad_files_with_what_to_do(state, tmp_path):
    def add(path, name="ckpt", **change):
        options = {"description": "a model", "source": "public, MIT", **change}
        return cli(state, "add", str(path), f"--name={name}", *[f"--{k}={v}" for k, v in options.items()])

    pt = tmp_path / "model.pt"
    torch.save(linear_state(), pt)
    out = add(pt)
    assert out.returncode == 2 and "model.pt not added: this is a pickle" in out.stderr
    assert "safetensors.torch.save_file(model.state_dict()" in out.stderr

    text = tmp_path / "notes.txt"
    text.write_text("not weights at all\n")
    out = add(text)
    assert out.returncode == 2 and "notes.txt not added: this is not a safetensors file" in out.stderr

    nan = linear_state()
    nan["0.bias"][0] = float("nan")
    save_file(nan, str(tmp_path / "nan.safetensors"))
    out = add(tmp_path / "nan.safetensors")
    assert out.returncode == 2 and "tensor '0.bias' holds 1 NaN or infinite value(s)" in out.stderr

    huge = tmp_path / "huge.safetensors"
    with open(huge, "wb") as f:  # sparse: refused on its size before a byte is read
        f.truncate(ck.MAX_BYTES + 1)
    out = add(huge)
    assert out.returncode == 2 and f"has {ck.MAX_BYTES + 1} bytes, more than {ck.MAX_BYTES}" in out.stderr

    good = tmp_path / "good.safetensors"
    save_file(linear_state(), str(good))
    out = add(good, name="Bad Name")
    assert out.returncode == 2 and "use 1 to 32 of a-z, 0-9, _ and -" in out.stderr
    out = add(good, source=" ")
    assert out.returncode == 2 and "give a --source of 1 to 2000" in out.stderr and "licence" in out.stderr
    out = cli(state, "add", str(good))
    assert out.returncode == 2 and "give the checkpoint a --name=NAME" in out.stderr
    out = add(tmp_path / "missing.safetensors")
    assert out.returncode == 2 and "cannot read" in out.stderr and "No such file" in out.stderr
    assert not (state / "jobs" / "checkpoints" / "index.json").exists()  # nothing was added


def test_a_file_changed_after_it_was_added_is_refused(state):
    registry = ck.CheckpointRegistry(state)
    entry = registry.add(save(linear_state()), name="mlp", description="d", source="s", added_by="olivia")
    loaded, values = registry.load("mlp", entry.sha256)
    assert loaded == entry and set(values) == {"0.weight", "0.bias"}
    path = registry.path(entry.sha256)
    edited = save({**linear_state(), "0.bias": torch.tensor([1e3, -1e3])})
    os.chmod(path, 0o644)
    path.write_bytes(edited)
    with pytest.raises(ck.CheckpointRefused, match="is not a read-only file of root's"):
        registry.load("mlp")
    os.chmod(path, 0o444)
    with pytest.raises(ck.CheckpointRefused, match=r"changed on disk after it was added \(its SHA-256 is now"):
        registry.load("mlp")
    with pytest.raises(ck.CheckpointRefused, match="replaced in the registry after the job was submitted"):
        registry.load("mlp", "0" * 64)


def test_a_kernels_account_cannot_write_or_read_the_registry(world_tmp, make_system_user):
    state = world_tmp / "state"
    registry = ck.CheckpointRegistry(state)
    entry = registry.add(save(linear_state()), name="mlp", description="d", source="s", added_by="olivia")
    user = make_system_user("kernel")
    probe = """
import os, sys
folder, kept = sys.argv[1], sys.argv[2]
for what, act in [
    ("replace the index", lambda: open(os.path.join(folder, "index.json"), "w")),
    ("add a file", lambda: open(os.path.join(folder, "new.safetensors"), "x")),
    ("change a checkpoint", lambda: open(kept, "r+b")),
    ("read a checkpoint", lambda: open(kept, "rb")),
    ("list the folder", lambda: os.listdir(folder)),
]:
    try:
        act()
        print(what, "ALLOWED")
    except PermissionError:
        print(what, "denied")
"""
    out = subprocess.run(
        [sys.executable, "-c", probe, str(registry.root), str(registry.path(entry.sha256))],
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:5] == [
        "replace the index denied",
        "add a file denied",
        "change a checkpoint denied",
        "read a checkpoint denied",
        "list the folder denied",
    ]
    assert registry.list() == [entry]


# -- jobs that start from a checkpoint ------------------------------------------------------------------------

world = test_runner.world  # the real runner, ledger and airlock, with the demo data
request = test_runner.request


def add_checkpoint(site, state_dict, name="mlp-public") -> ck.Checkpoint:
    return ck.CheckpointRegistry(site.state_dir).add(
        save(state_dict), name=name, description="pretrained on public data", source="tests; CC0", added_by="olivia"
    )


@pytest.mark.e2e
def test_a_job_from_a_checkpoint_starts_from_its_values_and_its_record_names_it(world):
    from paitient import airlock as kernel_airlock
    from paitient import jobs
    from paitient.rules import training_record
    from paitient.services.airlock import views
    from paitient.services.jobs import keys

    site, store, ledger, gate = world
    pretrained = linear_state(dtype=torch.float16)
    entry = add_checkpoint(site, pretrained)
    (listed,) = jobs.checkpoints()
    assert listed["name"] == "mlp-public" and listed["sha256"] == entry.sha256
    assert listed["parameters"] == {"0.weight": [2, 30], "0.bias": [2]} and listed["source"] == "tests; CC0"

    # lr 1e-8: the noise and the gradients barely move the weights, so they show where training started
    job = jobs.submit(nn.Sequential(nn.Linear(30, 2)), **request(lr=1e-8, epochs=1), checkpoint="mlp-public")
    job.wait(timeout=300, widget=False, poll=0.5)
    weights, envelope = store.released(job.id)
    record = training_record.verify(envelope, keys.load_public_key(keys.public_key_path(site)), weights)
    assert record["initialisation"] == {"checkpoint": entry.sha256, "name": "mlp-public"}
    trained = load_weights(weights)
    for name, tensor in pretrained.items():
        assert trained[name].dtype == torch.float32
        assert torch.allclose(trained[name], tensor.float(), atol=1e-3), name

    rid = kernel_airlock.request(job, justification="started from a public checkpoint")
    gate.wait_idle()
    checks = gate.describe(gate.store.get(rid), for_steward=True)["checks"]
    facts = dict(views.certified_facts(checks) or [])
    assert facts["Initial parameters"] == (
        f"pretrained checkpoint mlp-public from the operator's registry, SHA-256 {entry.sha256}"
    )


@pytest.mark.e2e
def test_a_checkpoint_that_does_not_fit_the_model_is_refused_at_submission(world):
    from paitient import jobs

    site, store, ledger, gate = world
    add_checkpoint(site, linear_state(out=2))
    fits = r"0.weight is \[4, 30\] in the model, \[2, 30\] in the checkpoint"
    with pytest.raises(jobs.ChannelError, match=fits) as e:
        jobs.submit(nn.Sequential(nn.Linear(30, 4)), **request(), checkpoint="mlp-public")
    assert getattr(e.value, "code", "") == "checkpoint_refused"
    with pytest.raises(jobs.ChannelError, match="there is no checkpoint 'other' in the registry"):
        jobs.submit(nn.Sequential(nn.Linear(30, 2)), **request(), checkpoint="other")
    assert jobs.JobsClient().list() == []  # nothing queued, nothing reserved
    assert ledger.runs("oncology") == []


@pytest.mark.e2e
def test_a_checkpoint_changed_on_disk_fails_the_job_before_any_budget_is_reserved(world):
    from paitient import jobs

    site, store, ledger, gate = world
    entry = add_checkpoint(site, linear_state())
    path = ck.CheckpointRegistry(site.state_dir).path(entry.sha256)
    path.write_bytes(save({**linear_state(), "0.bias": torch.tensor([50.0, -50.0])}))  # root ignores 0444
    job = jobs.submit(nn.Sequential(nn.Linear(30, 2)), **request(), checkpoint="mlp-public")
    with pytest.raises(jobs.JobFailed, match=r"checkpoint 'mlp-public': .*changed on disk after it was added"):
        job.wait(timeout=120, widget=False, poll=0.3)
    assert not [r for r in ledger.runs("oncology") if r["run_id"] == f"job:{job.id}"]
    assert not store.out_dir(job.id).exists()
