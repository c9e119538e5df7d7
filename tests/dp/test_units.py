"""Pure parts of paitient.kernel.dp: Poisson sampling, mode choice, model problems, weights hashing, widget data."""

import hashlib

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from paitient.kernel.dp.modes import choose_mode
from paitient.kernel.dp.run import dataset_version, default_delta, resolve_target
from paitient.kernel.dp.sampling import PoissonSampler, poisson_loader
from paitient.kernel.dp.validate import DPModelError, check_model, group_count, problems
from paitient.kernel.dp.weights import file_sha256, save_weights, weights_sha256
from paitient.kernel.dp.widget import budget_table_html, spending_series


def test_poisson_sampler_takes_each_row_with_probability_q():
    n, q, steps = 1000, 0.05, 2000
    s = PoissonSampler(n, q, steps, generator=torch.Generator().manual_seed(0))
    counts = torch.zeros(n)
    sizes = []
    for idx in s:
        assert torch.equal(idx, idx.unique())  # no row twice in a batch, sorted
        counts[idx] += 1
        sizes.append(len(idx))
    assert counts.mean().item() / steps == pytest.approx(q, rel=0.01)
    # per-row inclusion frequencies scatter like Binomial(steps, q) around q
    assert counts.std().item() == pytest.approx((steps * q * (1 - q)) ** 0.5, rel=0.1)
    assert torch.tensor(sizes, dtype=torch.float).var().item() == pytest.approx(n * q * (1 - q), rel=0.1)


def test_poisson_loader_yields_empty_batches_as_zero_rows():
    ds = TensorDataset(torch.randn(50, 3), torch.arange(50))
    loader = poisson_loader(DataLoader(ds, batch_size=1), generator=torch.Generator().manual_seed(1))
    batches = list(loader)
    assert len(batches) == 50 and len(loader) == 50
    empty = [b for b in batches if len(b[0]) == 0]
    assert empty and empty[0][0].shape == (0, 3) and empty[0][1].shape == (0,)
    assert poisson_loader(DataLoader(list(range(10)), batch_size=2)) is None  # not a TensorDataset


def test_mode_choice_says_why():
    lin = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    assert choose_mode(lin, opt, None)[0] == "fast"
    emb = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2))
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    assert choose_mode(emb, opt, nn.CrossEntropyLoss())[0] == "ghost"
    mode, why, _ = choose_mode(emb, opt, None)
    assert mode == "hooks" and "pass criterion=" in why
    ln = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    assert choose_mode(ln, torch.optim.SGD(ln.parameters(), lr=0.1), None)[0] == "fast"
    conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    mode, why, _ = choose_mode(conv, torch.optim.SGD(conv.parameters(), lr=0.1), nn.MSELoss())
    assert mode == "hooks" and "ghost clipping does not cover Conv1d" in why
    with pytest.raises(DPModelError, match="mode='fast' needs every trainable layer to be nn.Linear or a norm"):
        choose_mode(conv, torch.optim.SGD(conv.parameters(), lr=0.1), None, "fast")
    with pytest.raises(ValueError, match="mode must be one of auto, fast, ghost, hooks"):
        choose_mode(lin, opt, None, "turbo")


def test_problems_are_explained_not_fixed():
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.Flatten(), nn.Linear(6, 2, bias=False), nn.BatchNorm1d(2)
    )
    found = problems(model)
    assert len(found) == 2
    assert "layer '1' (BatchNorm2d(6))" in found[0] and "nn.GroupNorm(2, 6)" in found[0]
    assert "layer '4' (BatchNorm1d(2))" in found[1] and "nn.LayerNorm(2)" in found[1]
    assert "GroupNorm(" not in found[1].split("(not")[0]  # 2 channels: no GroupNorm keeps 2 per group
    assert (group_count(16), group_count(64), group_count(6), group_count(3)) == (8, 32, 2, None)
    other = nn.Linear(2, 2)
    with pytest.raises(DPModelError, match="optimizer holds 2 parameter"):
        check_model(nn.Linear(2, 2), torch.optim.SGD(other.parameters(), lr=0.1))
    frozen = nn.Linear(2, 2).requires_grad_(False)
    assert "no trainable parameters" in problems(frozen)[0]


def test_canonical_weights_hash(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    digest = save_weights(model, tmp_path / "m.safetensors")
    assert digest == hashlib.sha256((tmp_path / "m.safetensors").read_bytes()).hexdigest() == weights_sha256(model)
    # the same tensors saved by safetensors directly (any order, with metadata) hash alike canonically
    shuffled = dict(reversed(list(model.state_dict().items())))
    save_file(shuffled, tmp_path / "other.safetensors", metadata={"by": "someone"})
    assert hashlib.sha256((tmp_path / "other.safetensors").read_bytes()).hexdigest() != digest
    assert file_sha256(tmp_path / "other.safetensors") == digest
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-6
    assert weights_sha256(model) != digest  # any change is a different model


def test_resolve_target_and_defaults(tmp_path):
    budget = {
        "projects": {
            "oncology": [{"dataset": "breast_cancer"}, {"dataset": "gbsg2"}],
            "cardio": [{"dataset": "diabetes"}],
        }
    }
    with pytest.raises(ValueError, match="say which project to charge.*cardio, oncology"):
        resolve_target(budget, None, None)
    assert resolve_target(budget, "cardio", None)[:2] == ("cardio", "diabetes")
    with pytest.raises(ValueError, match="say which dataset.*breast_cancer, gbsg2"):
        resolve_target(budget, "oncology", None)
    with pytest.raises(ValueError, match="not a member of project 'x'"):
        resolve_target(budget, "x", None)
    assert default_delta(1e-5, 569) == pytest.approx(1e-6) and default_delta(1e-3, 1000) == pytest.approx(1e-4)
    ds = tmp_path / "oncology" / "breast_cancer"
    (ds / "versions" / "3").mkdir(parents=True)
    (ds / "versions" / "3" / "manifest.json").write_text('{"version": 3}')
    (ds / "current").symlink_to("versions/3")
    assert dataset_version("oncology", "breast_cancer", tmp_path) == 3
    assert dataset_version("oncology", "gbsg2", tmp_path) is None


def test_spending_series():
    runs = [
        {"dataset": "a", "state": "settled", "epsilon": 2, "epsilon_spent": 1.5, "created": 1, "closed": 10},
        {"dataset": "a", "state": "lost", "epsilon": 1, "epsilon_spent": None, "created": 2, "closed": 5},
        {"dataset": "a", "state": "reserved", "epsilon": 3, "epsilon_spent": None, "created": 3, "closed": None},
        {"dataset": "b", "state": "settled", "epsilon": 1, "epsilon_spent": 0.0, "created": 4, "closed": 6},
    ]
    assert spending_series(runs) == {"a": [(5, 1.0), (10, 2.5)], "b": [(6, 0.0)]}


def test_the_budget_table_shows_the_callers_part_only_where_the_project_shares_its_budget():
    row = {
        "dataset": "bc",
        "epsilon_total": 10.0,
        "epsilon_spent": 1.0,
        "epsilon_reserved": 3.0,
        "epsilon_left": 6.0,
        "delta_total": 1e-5,
        "delta_left": 1e-5,
        "runs": 2,
        "member_share": 1.0,
        "epsilon_left_member": 6.0,
    }
    plain = budget_table_html("onc", [row])
    assert "left for you" not in plain and "member_share" not in plain
    shared = budget_table_html("onc", [{**row, "member_share": 0.5, "epsilon_left_member": 1.0}])
    assert "<th>left for you</th>" in shared and "<td><b>6</b></td><td><b>1</b></td>" in shared
    assert "at most 0.5 of each dataset's epsilon" in shared


def test_without_a_ledger_nothing_trains(monkeypatch, tmp_path):
    from paitient import dp

    model = nn.Linear(3, 2)
    loader = DataLoader(TensorDataset(torch.randn(20, 3), torch.zeros(20, dtype=torch.long)), batch_size=5)
    monkeypatch.delenv("PAITIENT_RUN_DIR", raising=False)
    with pytest.raises(dp.LedgerUnavailable, match="PAITIENT_RUN_DIR is not set"):
        dp.make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.1), loader, target_epsilon=1.0, epochs=1, max_grad_norm=1.0
        )
    monkeypatch.setenv("PAITIENT_RUN_DIR", str(tmp_path))
    with pytest.raises(dp.LedgerUnavailable, match="is not running"):
        dp.make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.1), loader, target_epsilon=1.0, epochs=1, max_grad_norm=1.0
        )
