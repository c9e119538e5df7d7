"""The runner's DP-SGD: the update is the clipped, noised sum a loop computes; Poisson sampling; the accountant's
epsilon; refusals; utility on breast_cancer; evaluation; and an audit that tells a leaky model from a private one."""

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.metrics import roc_auc_score
from torch import nn

from paitient.kernel.jobs.export import export_graph
from paitient.rules import membership
from paitient.services.jobs.graph import initialise, load_graph
from paitient.services.jobs.train import (
    Plan,
    Progress,
    TrainError,
    TrainSpec,
    audited_ways,
    epsilon_after,
    evaluate,
    membership_audit,
    plan,
    poisson_rows,
    train,
    worst_membership_audit,
)

# the configuration of the utility figures (benchmarks/bench_jobs_utility.py): a few large batches
UTILITY = dict(epochs=5, batch_size=128, lr=2.0, max_grad_norm=1.0)


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


def graph_of(model, row=(30,)):
    g = load_graph(export_graph(model, torch.zeros(2, *row)))
    return g, (lambda p, x: torch.func.functional_call(g.module, p, (x,)))


def loop_reference(forward, start, x, y, clip):
    """The sum over rows of each row's gradient clipped to ``clip``, one row at a time with autograd."""
    total = {k: torch.zeros_like(v) for k, v in start.items()}
    for i in range(len(x)):
        p = {k: v.clone().requires_grad_(True) for k, v in start.items()}
        torch.nn.functional.cross_entropy(forward(p, x[i : i + 1]), y[i : i + 1]).backward()
        norm = torch.sqrt(sum((v.grad**2).sum() for v in p.values()))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for k, v in p.items():
            total[k] += v.grad * factor
    return total


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)), (5,)),
    "cnn": (
        lambda: nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 3 * 3, 3)),
        (1, 8, 8),
    ),
}


@pytest.mark.parametrize("clipping", ["auto", "exact"])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("sigma", [0.0, 0.8])
def test_one_step_is_the_clipped_noised_sum_a_loop_computes(name, clipping, sigma):
    make, row = MODELS[name]
    torch.manual_seed(0)
    g, forward = graph_of(make(), row)
    start = initialise(g, "default", seed=4)
    x, y = torch.randn(40, *row) * 3, torch.randint(0, 3, (40,))
    # sampling rate 1: every row is in the one step, and the seeded generator's first draw is its noise
    one = Plan(sample_rate=1.0, steps=1, noise_multiplier=sigma)
    result = train(forward, start, x, y, spec(lr=1.0, max_grad_norm=0.5, seed=7), the_plan=one, clipping=clipping)
    assert result.clipping == ("fast" if clipping == "auto" else "exact")
    clipped = loop_reference(forward, start, x, y, 0.5)
    sizes = [v.numel() for v in start.values()]
    noise = torch.empty(sum(sizes)).normal_(0.0, sigma * 0.5 / len(x), generator=torch.Generator().manual_seed(7))
    for (k, v), part in zip(start.items(), torch.split(noise, sizes), strict=True):
        want = v - (clipped[k] / len(x) + part.view(v.shape))
        torch.testing.assert_close(result.params[k], want, rtol=1e-4, atol=1e-5)


def test_poisson_sampling_takes_each_row_independently_at_the_rate():
    n, q, draws = 400, 0.05, 4000
    gen = torch.Generator().manual_seed(0)
    counts, sizes, pairs = torch.zeros(n), [], 0
    for _ in range(draws):
        rows = poisson_rows(n, q, gen)
        assert bool((rows[1:] > rows[:-1]).all()) and (len(rows) == 0 or 0 <= int(rows[0]) and int(rows[-1]) < n)
        counts[rows] += 1
        sizes.append(len(rows))
        pairs += int(bool((rows == 10).any()) and bool((rows == 11).any()))
    sizes = np.array(sizes)
    # the sample size is Binomial(n, q): its mean and variance
    assert abs(sizes.mean() - n * q) < 4 * math.sqrt(n * q * (1 - q) / draws)
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.1)
    # every row at the rate (a chi-square over rows), and two neighbours together at q^2 (independence)
    expected = draws * q
    chi2 = float((((counts - expected) ** 2) / expected).sum())
    assert chi2 < n + 5 * math.sqrt(2 * n)
    assert abs(pairs - draws * q * q) < 5 * math.sqrt(draws * q * q)
    assert (sizes == 0).sum() == 0 and len(poisson_rows(n, 1.0, gen)) == n
    assert sum(len(poisson_rows(100, 0.002, gen)) == 0 for _ in range(200)) > 100  # empty samples happen


def test_steps_without_rows_add_only_noise(cancer):
    xt, yt, _, _ = cancer
    g, forward = graph_of(nn.Sequential(nn.Linear(30, 2)))
    start = initialise(g, "default", seed=1)
    quiet = train(forward, start, xt, yt, spec(), the_plan=Plan(sample_rate=1e-9, steps=5, noise_multiplier=0.0))
    assert quiet.steps == 5 and all(torch.equal(quiet.params[k], start[k]) for k in start)
    assert all(math.isnan(v) for v in quiet.losses)
    noisy = train(forward, start, xt, yt, spec(), the_plan=Plan(sample_rate=1e-9, steps=5, noise_multiplier=1.0))
    moved = torch.cat([(noisy.params[k] - start[k]).reshape(-1) for k in start])
    assert float(moved.abs().max()) > 0  # noise alone moves it, as in DP-SGD


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_the_plan_reaches_the_target_and_the_accountant_agrees(cancer, accountant):
    xt, yt, _, _ = cancer
    g, forward = graph_of(nn.Sequential(nn.Linear(30, 2)))
    s = spec(accountant=accountant, epochs=5)
    p = plan(s, len(xt))
    assert p.sample_rate == pytest.approx(64 / 455) and p.steps == round(5 / (64 / 455))
    result = train(forward, initialise(g, "default", 0), xt, yt, s)
    assert result.steps == p.steps and result.noise_multiplier == p.noise_multiplier
    assert result.epsilon == pytest.approx(1.0, rel=0.02) and result.epsilon <= 1.0 + 1e-9
    assert result.epsilon == pytest.approx(epsilon_after(p.noise_multiplier, p.sample_rate, p.steps, 1e-5, accountant))
    assert len(result.losses) == 5 and all(0 < v < 5 for v in result.losses)


def test_stopping_early_spends_less_and_progress_says_what_was_spent(cancer):
    xt, yt, _, _ = cancer
    g, forward = graph_of(nn.Sequential(nn.Linear(30, 2)))
    full = plan(spec(), len(xt))
    seen: list[Progress] = []

    def on_step(progress):
        seen.append(progress)
        return progress.step < 30

    stopped = train(forward, initialise(g, "default", 1), xt, yt, spec(), on_step=on_step)
    assert full.steps > 30 and stopped.steps == 30 and [p.step for p in seen] == list(range(1, 31))
    assert stopped.epsilon == pytest.approx(epsilon_after(full.noise_multiplier, full.sample_rate, 30, 1e-5, "prv"))
    assert stopped.epsilon < 0.7  # the whole plan spends 1.0
    assert seen[-1].epsilon == pytest.approx(stopped.epsilon) and seen[9].epsilon < seen[-1].epsilon
    assert all(p.steps == full.steps for p in seen)


def test_an_unreachable_target_is_refused_with_what_to_do():
    with pytest.raises(TrainError, match="cannot be reached.*ask for a larger target_epsilon"):
        plan(spec(target_epsilon=1e-6, batch_size=1, epochs=1), 1)
    with pytest.raises(TrainError, match="or use the prv accountant"):  # RDP's floor at this delta
        plan(spec(target_epsilon=0.1, accountant="rdp"), 455)
    with pytest.raises(TrainError, match="batch_size 64 is more than the 50 training rows"):
        plan(spec(), 50)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(epochs=0), "epochs must be a whole number of at least 1"),
        (dict(batch_size=2.5), "batch_size must be a whole number"),
        (dict(lr=-1.0), "lr must be a number above 0"),
        (dict(max_grad_norm=float("nan")), "max_grad_norm must be a number above 0"),
        (dict(target_epsilon=0), "target_epsilon must be a number above 0"),
        (dict(delta=1.0), "delta must be a number above 0 and below 1"),
        (dict(optimizer="rmsprop"), "optimizer must be one of sgd, adam"),
        (dict(accountant="gdp"), "accountant must be one of prv, rdp"),
        (dict(loss="hinge"), "loss must be one of cross_entropy, bce_with_logits, smooth_hinge, mse"),
        (dict(seed=True), "seed must be a whole number"),
        (dict(momentum=1.0), "momentum must be a number from 0 to below 1"),
        (dict(momentum=-0.1), "momentum must be a number from 0 to below 1"),
        (dict(optimizer="adam", momentum=0.5), "momentum is sgd's; adam takes none"),
    ],
)
def test_a_spec_is_checked_when_made(change, message):
    with pytest.raises(TrainError, match=message):
        spec(**change)


def _smooth_hinge(z: float, y: int) -> float:
    """The loss as docs/jobs.md states it, one row at a time."""
    m = (2 * y - 1) * z
    return 0.0 if m >= 1 else 0.5 * (1 - m) ** 2 if m > 0 else 0.5 - m


def test_smooth_hinge_is_the_rounded_hinge_and_its_step_the_clipped_noised_sum_a_loop_computes():
    """Each row's loss is the stated formula on either side of its corners; one step (both ways of clipping) is
    the sum of each row's gradient of that loss, clipped, plus the noise, as a loop with autograd computes."""
    from paitient.services.jobs.train import sample_losses

    z = torch.tensor([[-2.0], [0.0], [0.3], [0.99], [1.0], [4.0], [-0.5], [2.0]])
    y = torch.tensor([[1.0], [1.0], [1.0], [1.0], [1.0], [1.0], [0.0], [0.0]])
    got = sample_losses("smooth_hinge")(z, y)
    want = [_smooth_hinge(float(a), int(b)) for a, b in zip(z.reshape(-1), y.reshape(-1), strict=True)]
    torch.testing.assert_close(got, torch.tensor(want))

    torch.manual_seed(0)
    g, forward = graph_of(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 1)), (6,))
    start = initialise(g, "default", seed=3)
    x, yb = torch.randn(40, 6) * 3, torch.randint(0, 2, (40, 1)).float()
    one = Plan(sample_rate=1.0, steps=1, noise_multiplier=0.8)
    clipped = {k: torch.zeros_like(v) for k, v in start.items()}
    for i in range(len(x)):
        p = {k: v.clone().requires_grad_(True) for k, v in start.items()}
        out = float(forward(p, x[i : i + 1]).detach())
        m = (2 * float(yb[i]) - 1) * forward(p, x[i : i + 1]).reshape(())
        loss = torch.where(m > 0, 0.5 * (1 - m).clamp(min=0) ** 2, 0.5 - m)
        assert float(loss) == pytest.approx(_smooth_hinge(out, int(yb[i])), abs=1e-6)
        loss.backward()
        norm = torch.sqrt(sum((v.grad**2).sum() for v in p.values()))
        for k, v in p.items():
            clipped[k] += v.grad * min(1.0, 0.5 / (float(norm) + 1e-6))
    sizes = [v.numel() for v in start.values()]
    noise = torch.empty(sum(sizes)).normal_(0.0, 0.8 * 0.5 / len(x), generator=torch.Generator().manual_seed(7))
    for clipping in ("auto", "exact"):
        step = spec(lr=1.0, max_grad_norm=0.5, seed=7, loss="smooth_hinge")
        result = train(forward, start, x, yb, step, the_plan=one, clipping=clipping)
        assert result.clipping == ("fast" if clipping == "auto" else "exact")
        for (k, v), part in zip(start.items(), torch.split(noise, sizes), strict=True):
            want = v - (clipped[k] / len(x) + part.view(v.shape))
            torch.testing.assert_close(result.params[k], want, rtol=1e-4, atol=1e-5)


def test_momentum_is_heavy_ball_over_the_noised_steps(cancer):
    """With momentum, each step moves by lr times the sum of this step's noised gradient and momentum times
    the last move's: three steps of full batches replayed by hand from each step's gradient without momentum,
    and the run without momentum differs."""
    xt, yt, _, _ = cancer
    g, forward = graph_of(nn.Sequential(nn.Linear(30, 2)))
    start = initialise(g, "zeros", 0)
    three = Plan(sample_rate=1.0, steps=3, noise_multiplier=0.0)
    base = dict(epochs=3, batch_size=len(xt), lr=0.5, max_grad_norm=1.0, seed=2)
    heavy = train(forward, start, xt, yt, spec(**base, momentum=0.9), the_plan=three).params
    params, velocity = dict(start), {k: torch.zeros_like(v) for k, v in start.items()}
    for _ in range(3):  # one step from params without momentum, at lr 1, is params minus the step's gradient
        one = train(forward, params, xt, yt, spec(**{**base, "lr": 1.0, "epochs": 1}), the_plan=Plan(1.0, 1, 0.0))
        grad = {k: params[k] - one.params[k] for k in params}
        velocity = {k: 0.9 * velocity[k] + grad[k] for k in params}
        params = {k: params[k] - 0.5 * velocity[k] for k in params}
    for k in params:
        torch.testing.assert_close(heavy[k], params[k], rtol=1e-4, atol=1e-6)
    plain = train(forward, start, xt, yt, spec(**base), the_plan=three).params
    assert not torch.allclose(plain["0.weight"], heavy["0.weight"])


def test_logistic_regression_at_epsilon_1_keeps_most_of_its_accuracy(cancer):
    """One seed (benchmarks/bench_jobs_utility.py takes the median of five and compares)."""
    xt, yt, xh, yh = cancer
    g, forward = graph_of(nn.Sequential(nn.Linear(30, 2)))
    result = train(forward, initialise(g, "zeros", 0), xt, yt, spec(**UTILITY))
    assert result.clipping == "fast" and result.epsilon == pytest.approx(1.0, rel=0.02)
    metrics = evaluate(forward, result.params, xh, yh, "cross_entropy")
    assert metrics["accuracy"] >= 0.93 and metrics["auroc"] >= 0.97


def test_evaluate_matches_sklearn():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=gen)
    three = nn.Linear(4, 3)
    forward = lambda p, v: torch.func.functional_call(three, p, (v,))  # noqa: E731
    params = {k: v.detach() for k, v in three.named_parameters()}
    y = torch.randint(0, 3, (300,), generator=gen)
    got = evaluate(forward, params, x, y, "cross_entropy")
    probs = torch.softmax(forward(params, x), 1).detach().numpy()
    assert got["accuracy"] == pytest.approx(float((probs.argmax(1) == y.numpy()).mean()))
    assert got["auroc"] == pytest.approx(roc_auc_score(y.numpy(), probs, multi_class="ovr", average="macro"))
    ce = torch.nn.functional.cross_entropy(forward(params, x), y)
    assert got["loss"] == pytest.approx(float(ce), rel=1e-5)

    one = nn.Linear(4, 1)
    forward1 = lambda p, v: torch.func.functional_call(one, p, (v,))  # noqa: E731
    params1 = {k: v.detach() for k, v in one.named_parameters()}
    yb = (x[:, 0] > 0).float()
    got = evaluate(forward1, params1, x, yb, "bce_with_logits")
    logits = forward1(params1, x).detach().reshape(-1)
    assert got["auroc"] == pytest.approx(roc_auc_score(yb.numpy(), torch.sigmoid(logits).numpy()))
    assert got["accuracy"] == pytest.approx(float(((logits >= 0).float() == yb).float().mean()))
    assert set(evaluate(forward1, params1, x, x[:, 1], "mse")) == {"loss"}
    # smooth_hinge: the output is a score, positive for the positive class
    got = evaluate(forward1, params1, x, yb, "smooth_hinge")
    assert got["auroc"] == pytest.approx(roc_auc_score(yb.numpy(), logits.numpy()))
    assert got["accuracy"] == pytest.approx(float(((logits > 0).float() == yb).float().mean()))
    rows = [_smooth_hinge(float(a), int(b)) for a, b in zip(logits, yb, strict=True)]
    assert got["loss"] == pytest.approx(float(np.mean(rows)), rel=1e-5)


def test_the_audit_tells_an_overfit_model_from_a_private_one(cancer):
    xt, _, xh, _ = cancer
    # labels drawn at random: nothing to learn but the rows themselves, so a model fit closely memorises them
    labels = torch.from_numpy(np.random.default_rng(1).integers(0, 2, len(xt) + len(xh)))
    few_x, few_y, yh = xt[:60], labels[:60], labels[len(xt) :]
    g, forward = graph_of(nn.Sequential(nn.Linear(30, 256), nn.ReLU(), nn.Linear(256, 2)))
    leaky = train(
        forward, initialise(g, "default", 0), few_x, few_y, spec(lr=0.5, epochs=400, batch_size=60, max_grad_norm=1e6),
        the_plan=Plan(sample_rate=1.0, steps=400, noise_multiplier=0.0), )  # fmt: skip
    private = train(forward, initialise(g, "default", 0), few_x, few_y, spec(epochs=5, batch_size=20))
    loud = membership_audit(forward, leaky.params, few_x, few_y, xh, yh, "cross_entropy", seed=0)
    quiet = membership_audit(forward, private.params, few_x, few_y, xh, yh, "cross_entropy", seed=0)
    assert set(loud) == {f"{a}{end}" for a in ("mia_loss", "mia_calibrated") for end in ("", "_low", "_high")}
    for numbers in (loud, quiet):
        assert all(type(v) is float and 0 <= v <= 0.5 and v == float(f"{v:.2g}") for v in numbers.values())
        for attack in ("mia_loss", "mia_calibrated"):
            assert numbers[f"{attack}_low"] <= numbers[attack] <= numbers[f"{attack}_high"]
    # the overfit model: both attacks far from a coin, the intervals clear of 0; the private one: close to a coin
    assert min(loud["mia_loss"], loud["mia_calibrated"]) > 0.2
    assert min(loud["mia_loss_low"], loud["mia_calibrated_low"]) > 0.15
    assert max(quiet["mia_loss"], quiet["mia_calibrated"]) < 0.1
    assert membership_audit(forward, leaky.params, few_x, few_y, xh, yh, "cross_entropy", seed=0) == loud


class Switched(nn.Module):
    """A classifier while training; a constant (logits 0) with dropout off, where the audit looked."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(30, 256)
        self.out = nn.Linear(256, 2)

    def forward(self, x):
        d = nn.functional.dropout(x[:, :1] * 0 + 1, 0.5)  # 0 or 2 while training, 1 without dropout
        on = d * (d * -1 + 2)  # 0 while training, 1 without dropout
        return self.out(torch.relu(self.hidden(x))) * (on * -1 + 1)


def test_the_audit_reads_the_weights_as_trained_too_where_dropout_switches_the_graph(cancer):
    """Audited with dropout off only, a graph that computes a constant there and a classifier while training
    shows a coin's membership numbers for weights that memorised their rows. The audit takes both ways and
    each attack's worse."""
    xt, _, xh, _ = cancer
    labels = torch.from_numpy(np.random.default_rng(1).integers(0, 2, len(xt) + len(xh)))
    few_x, few_y, yh = xt[:60], labels[:60], labels[len(xt) :]
    g, forward = graph_of(Switched())

    def evaluated(p, x):
        return torch.func.functional_call(g.eval_module, p, (x,))

    leaky = train(
        forward, initialise(g, "default", 0), few_x, few_y, spec(lr=0.5, epochs=400, batch_size=60, max_grad_norm=1e6),
        the_plan=Plan(sample_rate=1.0, steps=400, noise_multiplier=0.0), )  # fmt: skip
    off = membership_audit(evaluated, leaky.params, few_x, few_y, xh, yh, "cross_entropy", seed=0)
    assert off["mia_loss"] == off["mia_calibrated"] == 0.0  # what the audit alone would have signed
    both = worst_membership_audit([evaluated, forward], leaky.params, few_x, few_y, xh, yh, "cross_entropy", seed=0)
    assert set(both) == set(off)
    assert min(both["mia_loss"], both["mia_calibrated"]) > 0.2, both


class BatchSwitched(nn.Module):
    """A classifier for one row at a time; 0 for a batch of distinct rows, whose spread is not 0."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(30, 64)
        self.out = nn.Linear(64, 2)

    def forward(self, x):
        centred = x - x.mean(0, keepdim=True)
        spread = (centred * centred).sum(1, keepdim=True)  # 0 exactly for a batch of one row
        alone = torch.relu(torch.neg(spread * 1e30) + 1.0)  # 1 for one row, 0 for many
        return self.out(torch.relu(self.hidden(x))) * alone


def test_the_audit_and_the_metrics_read_a_graph_that_tells_one_row_from_many_as_trained(cancer):
    """A graph whose rows' outputs read each other is trained one row at a time (the exact way); the worker
    evaluated it, and ran both membership attacks, with every row in one call. A graph that computes a
    classifier for one row and a constant for many then had the runner sign a coin's numbers (0, 0) for
    weights that memorised random labels. Its metrics are now computed row by row, and the audit reads both
    ways and takes each attack's worse."""
    xt, _, xh, _ = cancer
    labels = torch.from_numpy(np.random.default_rng(1).integers(0, 2, len(xt) + len(xh)))
    few_x, few_y, yh = xt[:60], labels[:60], labels[len(xt) :]
    g, forward = graph_of(BatchSwitched())
    assert not g.rows_independent

    def evaluated(p, x):
        return torch.func.functional_call(g.eval_module, p, (x,))

    leaky = train(
        forward, initialise(g, "default", 0), few_x, few_y, spec(lr=0.5, epochs=400, batch_size=60, max_grad_norm=1e6),
        the_plan=Plan(sample_rate=1.0, steps=400, noise_multiplier=0.0), clipping="exact", )  # fmt: skip
    whole = worst_membership_audit([evaluated], leaky.params, few_x, few_y, xh, yh, "cross_entropy", seed=0)
    assert whole["mia_loss"] == whole["mia_calibrated"] == 0.0  # what the runner signed before
    tested, ways = audited_ways(evaluated, forward, dropout=False, rows_independent=g.rows_independent)
    audit = worst_membership_audit(ways, leaky.params, few_x, few_y, xh, yh, "cross_entropy", seed=0)
    assert set(audit) == set(whole)
    assert min(audit["mia_loss"], audit["mia_calibrated"]) > 0.2, audit
    assert evaluate(tested, leaky.params, few_x, few_y, "cross_entropy")["accuracy"] == 1.0  # memorised, as trained
    assert evaluate(evaluated, leaky.params, few_x, few_y, "cross_entropy")["loss"] == pytest.approx(math.log(2))
    # A graph whose rows are independent is evaluated and audited as one call, as before.
    plain, _ = graph_of(nn.Sequential(nn.Linear(30, 2)))
    assert plain.rows_independent
    assert audited_ways(evaluated, forward, dropout=True, rows_independent=True) == (evaluated, [evaluated, forward])


def test_calibration_offsets_by_class_and_by_target_bin():
    ref_loss = np.array([1.0, 3.0, 10.0, 30.0])
    ref_t = np.array([0, 0, 1, 1])
    assert membership.class_offsets(ref_loss, ref_t, np.array([1, 0, 2])).tolist() == [20.0, 2.0, 6.5]
    targets = np.arange(100.0)
    by_bin = membership.class_offsets(targets * 2, targets, np.array([0.0, 99.0]), classes=False)
    assert by_bin[0] < 40 < 160 < by_bin[1]
    gap, low, high = membership.bootstrap_gap([3, 4, 5], [0, 1, 2], resamples=50, seed=0)
    assert gap == 0.5 and low <= high <= 0.5
    assert membership.bootstrap_gap([3, 4, 5], [0, 1, 2], resamples=50, seed=0) == (gap, low, high)


def test_the_device_is_cuda_when_torch_sees_a_gpu_and_the_cpu_otherwise(monkeypatch):
    from paitient.services.jobs.train import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(TrainError, match="no GPU"):
        pick_device("cuda")
    with pytest.raises(TrainError, match="device must be one of"):
        pick_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cpu") == torch.device("cpu")


def test_a_run_trains_without_tf32_and_gives_the_settings_back(monkeypatch):
    """cuDNN allows TF32 in convolutions by default; a run turns it off (and TF32 in matrix products) while it
    trains, so the clipping bound holds to float32 rounding, and restores what the process had, even when the
    run fails."""
    from paitient.services.jobs import train as train_module

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    seen = []

    def record(*args):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        raise TrainError("stop here")

    monkeypatch.setattr(train_module, "plan", record)  # the first thing a run does without a plan given
    try:
        with pytest.raises(TrainError, match="stop here"):
            train_module.train(None, {}, torch.zeros(1), torch.zeros(1), None)  # type: ignore[arg-type]
        assert seen == [(False, False)]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_numbers_in_the_graph_reach_the_trained_weights_so_a_steward_reads_them(cancer):
    """What a graph lets out: DP-SGD bounds what the weights say of any one row, not what the graph says.
    Numbers the kernel writes into the graph (read from the data in the notebook, say) are pulled into a
    parameter by training, at epsilon 1 from the runner's own start, and leave with the weights. So the
    graph is the researcher's choice, listed for the steward, and weights of a graph the stewards did not
    approve are never released without one (tests/jobs/test_runner.py)."""
    from tests.jobs.test_graph import Steered

    xt, yt, _, _ = cancer
    pull = [0.4172, 0.8391, 0.1234, 0.9876]
    g, forward = graph_of(Steered(pull))
    start = initialise(g, "default", seed=3)
    assert torch.equal(start["carrier"], torch.zeros(4))  # nothing of the kernel's values
    result = train(forward, start, xt, yt.float(), spec(loss="mse", lr=0.1))
    assert result.epsilon <= 1.0
    assert torch.allclose(result.params["carrier"], torch.tensor(pull), atol=0.1), result.params["carrier"]
    assert {0.4172, 0.8391, 0.1234, 0.9876} <= set(g.numbers)


def test_weights_are_numbers_whether_or_not_a_row_makes_the_gradient_infinite():
    """Through the trainer, both ways: a row whose output is infinite (``test_persample.Infinite``) adds
    nothing, so the weights are numbers with it or without it."""
    from tests.jobs.test_persample import Infinite, raw_breast_cancer

    graph = load_graph(export_graph(Infinite(), torch.zeros(2, 30)))
    forward = lambda p, x: torch.func.functional_call(graph.module, p, (x,))  # noqa: E731
    params = initialise(graph, "default", seed=1)
    x, y = raw_breast_cancer()
    spec = TrainSpec(epochs=2, batch_size=256, lr=0.1, optimizer="sgd", max_grad_norm=1.0, target_epsilon=1.0,
                     delta=1e-5, accountant="prv", loss="cross_entropy", seed=3)  # fmt: skip
    for way in ("auto", "exact"):
        result = train(forward, params, x, y, spec, clipping=way, device="cpu")
        assert all(torch.isfinite(v).all() for v in result.params.values()), way


def _domains(monkeypatch) -> list[int]:
    """The sizes of every discretisation Opacus' PRV accountant makes from now on."""
    from opacus.accountants import PRVAccountant

    sizes: list[int] = []
    get_domain = PRVAccountant._get_domain

    def watched(self, **kwargs):
        domain = get_domain(self, **kwargs)
        sizes.append(domain.size)
        return domain

    monkeypatch.setattr(PRVAccountant, "_get_domain", watched)
    return sizes


def test_a_plan_beyond_the_accountants_bound_is_refused_before_the_accountant_runs(monkeypatch):
    """The red team's request: epsilon 100 over 20 epochs of one row in 455 (9,100 steps) took the root runner's
    planning from 0.7 to 3.3 GB and MemoryError (1000 epochs: 22.6 GB and the OOM killer; epsilon 0.001: 14 s of
    CPU). It is refused, saying what to ask for, before the accountant discretises anything."""
    import paitient.services.jobs.train as train_mod

    def no_accountant(name):
        raise AssertionError("the accountant ran")

    monkeypatch.setattr(train_mod, "_accountant", no_accountant)
    sizes = _domains(monkeypatch)
    with pytest.raises(
        TrainError, match=r"target_epsilon 100 over 9100 steps .* ask for fewer epochs or a larger batch_size"
    ):
        plan(spec(epochs=20, batch_size=1, target_epsilon=100.0, delta=1 / 4550), 455)
    with pytest.raises(
        TrainError, match=r"is 455000 steps, more than the 20000 the runner plans: ask for at most 43 epochs"
    ):
        plan(spec(epochs=1000, batch_size=1, target_epsilon=0.001, delta=1 / 4550), 455)
    assert sizes == []


def test_a_plan_at_the_bound_plans_and_no_discretisation_is_beyond_it(monkeypatch):
    """At :data:`jobspec.MAX_STEPS` steps (40 epochs of one row in 500) the plan is made, and neither it nor a
    request whose bisection Opacus would have taken through 5.5 M points (epsilon 10 over 9,100 steps) ever
    discretises over more than :data:`jobspec.MAX_ACCOUNTING_POINTS`; what it plans spends at most the target."""
    from paitient.rules.jobspec import MAX_ACCOUNTING_POINTS, MAX_STEPS

    sizes = _domains(monkeypatch)
    at_bound = spec(epochs=40, batch_size=1, target_epsilon=1.0, delta=1 / 5000)
    p = plan(at_bound, 500)
    assert p.steps == MAX_STEPS == 20_000
    assert epsilon_after(p.noise_multiplier, p.sample_rate, p.steps, 1 / 5000, "prv") <= 1.0
    wide = spec(epochs=20, batch_size=1, target_epsilon=10.0, delta=1 / 4550)
    q = plan(wide, 455)
    assert q.steps == 9100 and epsilon_after(q.noise_multiplier, q.sample_rate, q.steps, 1 / 4550, "prv") <= 10.0
    assert sizes and max(sizes) <= MAX_ACCOUNTING_POINTS
    with pytest.raises(TrainError, match="cannot account for 9100 steps at noise 0.3 within"):
        epsilon_after(0.3, q.sample_rate, q.steps, 1 / 4550, "prv")
    assert max(sizes) <= MAX_ACCOUNTING_POINTS
