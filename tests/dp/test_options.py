"""RunOptions: each option's check names the option, the value and what is allowed; a run is made of its parts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from paitient import dp
from paitient.kernel.dp.options import OptionsError, RunOptions

from .conftest import mlp

GOOD = {"target_epsilon": 1.0, "epochs": 2, "max_grad_norm": 1.0}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"target_epsilon": 0}, "target_epsilon must be a positive number (e.g. 1.0), got 0"),
        ({"target_epsilon": -2.5}, "target_epsilon must be a positive number (e.g. 1.0), got -2.5"),
        ({"target_epsilon": float("inf")}, "target_epsilon must be a positive number (e.g. 1.0), got inf"),
        ({"target_epsilon": float("nan")}, "target_epsilon must be a positive number (e.g. 1.0), got nan"),
        ({"target_epsilon": True}, "target_epsilon must be a positive number (e.g. 1.0), got True"),
        ({"target_epsilon": "3"}, "target_epsilon must be a positive number (e.g. 1.0), got '3'"),
        ({"epochs": 0}, "epochs must be a whole number >= 1, got 0"),
        ({"epochs": 2.5}, "epochs must be a whole number >= 1, got 2.5"),
        ({"epochs": True}, "epochs must be a whole number >= 1, got True"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be a positive number (e.g. 1.0), got -1.0"),
        ({"max_grad_norm": None}, "max_grad_norm must be a positive number (e.g. 1.0), got None"),
        (
            {"target_delta": 1.5},
            "target_delta must lie between 0 and 1 (e.g. 1e-6), or be left out for the dataset's default, got 1.5",
        ),
        (
            {"target_delta": 0.0},
            "target_delta must lie between 0 and 1 (e.g. 1e-6), or be left out for the dataset's default, got 0.0",
        ),
        ({"project": ""}, "project must be a project's name, or be left out when you have one, got ''"),
        ({"dataset": 3}, "dataset must be a dataset's name, or be left out when you have one, got 3"),
        ({"mode": "turbo"}, "mode must be one of auto, fast, ghost, hooks; got 'turbo'"),
        ({"loss_reduction": "max"}, "loss_reduction must be 'mean' or 'sum', got 'max'"),
        ({"progress": "yes"}, "progress must be True or False, got 'yes'"),
    ],
)
def test_each_option_is_checked_and_the_message_says_what_is_allowed(change, message):
    with pytest.raises(OptionsError) as e:
        RunOptions(**{**GOOD, **change})
    assert str(e.value) == message
    assert e.value.problems == [message]
    assert isinstance(e.value, ValueError)  # callers that caught make_private's ValueError still do


def test_every_bad_option_is_named_at_once():
    with pytest.raises(OptionsError) as e:
        RunOptions(target_epsilon=-1, epochs=0, max_grad_norm=0, mode="x")
    assert [p.split(" ", 1)[0] for p in e.value.problems] == ["target_epsilon", "epochs", "max_grad_norm", "mode"]
    assert str(e.value) == "; ".join(e.value.problems)


def test_numbers_of_numpy_types_are_stored_as_plain_numbers_and_the_options_are_frozen():
    opts = RunOptions(
        target_epsilon=np.float32(1.5), epochs=np.int64(3), max_grad_norm=np.float64(2), target_delta=np.float32(1e-6)
    )
    assert (opts.target_epsilon, opts.epochs, opts.max_grad_norm) == (1.5, 3, 2.0)
    assert type(opts.target_epsilon) is float and type(opts.epochs) is int and type(opts.target_delta) is float
    assert opts.target_delta == pytest.approx(1e-6)
    assert (opts.project, opts.dataset, opts.mode, opts.loss_reduction, opts.progress) == (
        None,
        None,
        "auto",
        "mean",
        True,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.epochs = 10


def test_make_private_checks_the_options_before_the_model_and_the_ledger(monkeypatch, loader):
    monkeypatch.delenv("PAITIENT_RUN_DIR", raising=False)  # no ledger to reach: nothing gets that far
    model = nn.Sequential(nn.Linear(30, 16), nn.BatchNorm1d(16), nn.Linear(16, 2))  # a model DP cannot train
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(OptionsError, match=r"^target_epsilon must be a positive number \(e.g. 1.0\), got 0$"):
        dp.make_private(model, opt, loader, target_epsilon=0, epochs=1, max_grad_norm=1.0)


def test_a_run_holds_its_options_plan_and_parts_and_repeats_from_its_options(service, site, member, loader, cancer):
    def start(model: nn.Module, **options: object) -> dp.PrivateRun:
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        return dp.make_private(
            model, opt, loader, run_dir=site.run_dir, noise_generator=torch.Generator().manual_seed(0), **options
        )

    run = start(
        mlp(),
        target_epsilon=np.float64(0.5),
        epochs=2,
        max_grad_norm=1,
        project="oncology",
        dataset="breast_cancer",
        progress=False,
    )
    assert run.options == RunOptions(
        target_epsilon=0.5, epochs=2, max_grad_norm=1.0, project="oncology", dataset="breast_cancer", progress=False
    )
    plan = run.plan
    assert (plan.project, plan.dataset, plan.mode) == ("oncology", "breast_cancer", "fast")
    assert plan.planned_steps == 2 * len(loader) and plan.sample_rate == 1 / len(loader)
    assert plan.dataset_size == len(cancer) and plan.target_delta == min(1e-5 / 10, 1 / (10 * len(cancer)))
    assert run.parts.optimizer is run.optimizer and run.parts.clipper is not None
    # the run's attributes are its parts', read-only
    assert (run.target_epsilon, run.epochs, run.project, run.noise_multiplier) == (
        0.5,
        2,
        "oncology",
        plan.noise_multiplier,
    )
    with pytest.raises(AttributeError):
        run.epochs = 5
    row = service.ledger.run(run.reservation)
    assert (row["epsilon"], row["delta"]) == (0.5, plan.target_delta)
    run.finish()
    # the options are make_private's keyword arguments: the same run again, on budget of its own
    again = start(mlp(), **dataclasses.asdict(run.options))
    assert again.options == run.options and again.plan == run.plan
    assert again.reservation != run.reservation
    again.finish()
