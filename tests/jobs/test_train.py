"""The runner's DP-SGD: the update is the clipped, noised sum; the accountant's epsilon; utility on breast_cancer;
and an audit that tells a leaky model from a private one."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from torch import nn

from paitient.kernel.jobs.export import export_graph
from paitient.services.jobs.graph import initialise, load_graph
from paitient.services.jobs.train import (
    Plan,
    TrainError,
    TrainSpec,
    epsilon_after,
    evaluate,
    membership_audit,
    plan,
    train,
)


def spec(**change) -> TrainSpec:
    base = dict(epochs=20, batch_size=64, lr=0.5, optimizer="sgd", max_grad_norm=1.0, target_epsilon=1.0,
                delta=1e-5, accountant="prv", loss="cross_entropy", seed=0)  # fmt: skip
    return TrainSpec(**{**base, **change})


@pytest.fixture(scope="module")
def cancer():
    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    hold, tr = order[:114], order[114:]
    mu, sd = x[tr].mean(0), x[tr].std(0)
    xs = ((x - mu) / sd).astype(np.float32)
    return tuple(map(torch.from_numpy, (xs[tr], y[tr], xs[hold], y[hold])))


def graph_of(model, width=30):
    g = load_graph(export_graph(model, torch.zeros(2, width)))
    return g, (lambda p, x: torch.func.functional_call(g.module, p, (x,)))


def test_one_step_is_the_clipped_noised_mean_a_loop_computes():
    torch.manual_seed(0)
    g, forward = graph_of(nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)), 5)
    start = initialise(g, "default", seed=4)
    x, y = torch.randn(40, 5) * 3, torch.randint(0, 2, (40,))
    # sampling rate 1 and no noise: every row is in the one step, and the update is exact
    one = Plan(sample_rate=1.0, steps=1, noise_multiplier=0.0)
    got = train(forward, start, x, y, spec(lr=1.0, max_grad_norm=0.5), the_plan=one).params
    expected = {k: torch.zeros_like(v) for k, v in start.items()}
    for i in range(len(x)):
        p = {k: v.clone().requires_grad_(True) for k, v in start.items()}
        torch.nn.functional.cross_entropy(forward(p, x[i : i + 1]), y[i : i + 1]).backward()
        norm = torch.sqrt(sum((v.grad**2).sum() for v in p.values()))
        factor = min(1.0, 0.5 / (float(norm) + 1e-6))
        for k, v in p.items():
            expected[k] += v.grad * factor
    for k in start:
        assert torch.allclose(got[k], start[k] - expected[k] / len(x), atol=1e-5), k


def test_the_plan_reaches_the_target_and_the_accountant_agrees():
    p = plan(spec(), 455)
    assert p.sample_rate == pytest.approx(64 / 455) and p.steps == round(20 / (64 / 455))
    assert epsilon_after(p.noise_multiplier, p.sample_rate, p.steps, 1e-5, "prv") == pytest.approx(1.0, rel=0.02)
    assert epsilon_after(p.noise_multiplier, p.sample_rate, p.steps // 2, 1e-5, "prv") < 0.8  # fewer steps, less


def test_an_unreachable_target_is_refused_with_what_to_do():
    with pytest.raises(TrainError, match="ask for a larger target_epsilon"):
        plan(spec(target_epsilon=1e-3, epochs=1000, batch_size=455), 455)


def test_poisson_sampling_takes_each_row_at_the_rate(cancer):
    xt, yt, _, _ = cancer
    g, forward = graph_of(nn.Sequential(nn.Linear(30, 2)))
    seen = []

    def forward_counting(p, x):
        seen.append(len(x))
        return forward(p, x)

    train(forward_counting, initialise(g, "default", 1), xt, yt, spec(epochs=4), the_plan=Plan(0.1, 200, 1.0))
    sizes = np.array(seen[1::2])  # per step: the vmapped gradients see one row each; the loss sees the sample
    assert abs(sizes.mean() - 0.1 * len(xt)) < 3 * np.sqrt(0.1 * 0.9 * len(xt) / len(sizes))


def test_stopping_early_spends_less(cancer):
    xt, yt, _, _ = cancer
    g, forward = graph_of(nn.Sequential(nn.Linear(30, 2)))
    full = plan(spec(), len(xt))
    stopped = train(forward, initialise(g, "default", 1), xt, yt, spec(), on_step=lambda p: p.step < 30)
    assert full.steps > 30 and stopped.steps == 30 and stopped.epsilon < 0.7  # the whole plan spends 1.0


def test_logistic_regression_at_epsilon_1_keeps_its_accuracy(cancer):
    xt, yt, xh, yh = cancer
    g, forward = graph_of(nn.Sequential(nn.Linear(30, 2)))
    result = train(forward, initialise(g, "default", 0), xt, yt, spec())
    assert result.epsilon == pytest.approx(1.0, rel=0.02) and result.steps == plan(spec(), len(xt)).steps
    # non-private logistic regression reaches about 0.96-0.97 on this split; DP at epsilon 1 stays within half a point
    assert evaluate(forward, result.params, xh, yh, "cross_entropy")["accuracy"] >= 0.95


def test_the_audit_tells_an_overfit_model_from_a_private_one(cancer):
    xt, _, xh, _ = cancer
    # labels drawn at random: nothing to learn but the rows themselves, so a model fit closely memorises them
    labels = torch.from_numpy(np.random.default_rng(1).integers(0, 2, len(xt) + len(xh)))
    few_x, few_y, yh = xt[:40], labels[:40], labels[len(xt) :]
    g, forward = graph_of(nn.Sequential(nn.Linear(30, 256), nn.ReLU(), nn.Linear(256, 2)))
    leaky = train(
        forward, initialise(g, "default", 0), few_x, few_y, spec(lr=0.5, epochs=400, batch_size=40),
        the_plan=Plan(sample_rate=1.0, steps=400, noise_multiplier=0.0), )  # fmt: skip
    private = train(forward, initialise(g, "default", 0), few_x, few_y, spec(epochs=5, batch_size=20))
    loud = membership_audit(forward, leaky.params, few_x, few_y, xh, yh, "cross_entropy", seed=0)
    quiet = membership_audit(forward, private.params, few_x, few_y, xh, yh, "cross_entropy", seed=0)
    assert loud["mia_loss"] > 0.2 and quiet["mia_loss"] < loud["mia_loss"]
    assert all(0 <= v <= 0.5 and v == float(f"{v:.2g}") for v in loud.values())
    assert loud["mia_loss_low"] <= loud["mia_loss"] <= loud["mia_loss_high"]
