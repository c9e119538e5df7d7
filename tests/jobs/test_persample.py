"""The two ways to the clipped sum agree, the fast one on the graphs it supports, and it refuses the others."""

import pytest
import torch
from torch import nn

from paitient.kernel.jobs.export import export_graph
from paitient.services.jobs.graph import initialise, load_graph
from paitient.services.jobs.persample import (
    FastClipper,
    Unsupported,
    exact_clipped_sum,
    fast_path_agrees,
    probe_size,
)
from paitient.services.jobs.train import sample_losses


class Mean(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return x.mean(self.dim)


GRAPHS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)), (7,)),
    "no bias": (lambda: nn.Sequential(nn.Linear(7, 5, bias=False), nn.ELU(), nn.Linear(5, 3)), (7,)),
    "cnn": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, stride=2, dilation=1),
            nn.ReLU(),
            nn.Conv2d(6, 5, 2, bias=False, dilation=2, padding=2),
            nn.Flatten(),
            nn.LazyLinear(3),
        ),
        (2, 12, 12),
    ),  # fmt: skip
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)), (3, 15)),
    "layer norm": (lambda: nn.Sequential(nn.Linear(7, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3)), (7,)),
    "group norm": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
        ),
        (1, 8, 8),
    ),
    "sequence": (lambda: nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3), Mean(1)), (5, 6)),
}


def exported(name):
    make, row = GRAPHS[name]
    model = make()
    model(torch.zeros(2, *row))  # sizes the lazy layers
    graph = load_graph(export_graph(model, torch.zeros(2, *row)))
    return graph, row, lambda p, x: torch.func.functional_call(graph.module, p, (x,))


@pytest.mark.parametrize("name", list(GRAPHS))
@pytest.mark.parametrize("clip", [0.05, 1.0, 1e4])  # most, some, no rows clipped
def test_the_fast_way_gives_the_exact_sum_on_exported_graphs(name, clip):
    graph, row, forward = exported(name)
    params = initialise(graph, "default", seed=3)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(37, *row, generator=gen) * 2, torch.randint(0, 3, (37,), generator=gen)
    losses = sample_losses("cross_entropy")
    clipper = FastClipper(forward, losses)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    assert fast_path_agrees(clipper, leaves, x, y, seed=0, loss="cross_entropy")
    got, got_norms, got_losses = clipper.clipped_sum(leaves, x, y, clip)
    want, norms, want_losses = exact_clipped_sum(forward, losses, params, x, y, clip)
    assert all(v.grad is None for v in leaves.values())  # the captures left no gradient behind
    torch.testing.assert_close(got_norms, norms, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_losses, want_losses, rtol=1e-5, atol=1e-6)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


def test_scale_and_into_add_the_scaled_sum_to_what_is_there():
    graph, row, forward = exported("mlp")
    params = initialise(graph, "default", seed=1)
    x, y = torch.randn(20, *row), torch.randint(0, 3, (20,))
    clipper = FastClipper(forward, sample_losses("cross_entropy"))
    want, _, _ = clipper.clipped_sum({k: v.clone().requires_grad_(True) for k, v in params.items()}, x, y, 0.3)
    start = {k: torch.full_like(v, 2.0) for k, v in params.items()}
    into = {k: v.clone() for k, v in start.items()}
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    clipper.clipped_sum(leaves, x, y, 0.3, scale=0.25, into=into)
    exact_into = {k: v.clone() for k, v in start.items()}
    exact_clipped_sum(forward, sample_losses("cross_entropy"), params, x, y, 0.3, scale=0.25, into=exact_into)
    for k in want:
        torch.testing.assert_close(into[k], start[k] + 0.25 * want[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(exact_into[k], into[k], rtol=1e-4, atol=1e-5)


class MixesRows(nn.Module):
    """Normalises each feature over the batch: a row's output depends on the other rows."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(h - h.mean(0, keepdim=True))


class Shared(nn.Module):
    """One layer applied twice: its parameters are read by two operations."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)

    def forward(self, x):
        return self.a(torch.tanh(self.a(x)))[:, :2]


class Transposed(nn.Module):
    """Reads a weight through an operation on the weight alone (its transpose)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 5))

    def forward(self, x):
        return x @ self.w.t()


@pytest.mark.parametrize(
    "model",
    [MixesRows(), Shared(), Transposed(), nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Linear(8, 2))],
    ids=["mixes rows", "shared layer", "transposed weight", "dropout"],
)
def test_models_the_fast_way_cannot_clip_train_the_exact_way(model):
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def forward(p, x):
        return torch.func.functional_call(model, p, (x,))

    clipper = FastClipper(forward, sample_losses("cross_entropy"))
    x, y = torch.randn(40, 5), torch.randint(0, 2, (40,))
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    assert not fast_path_agrees(clipper, leaves, x, y, seed=0, loss="cross_entropy")
    assert all(v.grad is None for v in leaves.values())


def test_a_refused_step_adds_nothing():
    model = Shared()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    into = {k: torch.ones_like(v) for k, v in params.items()}
    clipper = FastClipper(lambda p, x: torch.func.functional_call(model, p, (x,)), sample_losses("cross_entropy"))
    with pytest.raises(Unsupported, match="more than one operation"):
        clipper.clipped_sum(params, torch.randn(8, 5), torch.randint(0, 2, (8,)), 1.0, into=into)
    assert all(bool((v == 1).all()) for v in into.values())


def test_the_probe_size_is_a_prime_no_dimension_has():
    assert probe_size([(5,), (3, 4)]) == 11
    assert probe_size([(11, 13), (17,)]) == 19
    assert probe_size([(64,), (256, 64)]) == 11


@pytest.mark.parametrize("name", ["mlp", "cnn", "layer norm", "sequence"])
@pytest.mark.parametrize("rows", [0, 1, 2])
def test_poisson_batches_of_no_row_or_one_row(name, rows):
    """A Poisson sample may hold no row (the sum is zero, nothing is added) or one (its clipped gradient)."""
    graph, row, forward = exported(name)
    params = initialise(graph, "default", seed=5)
    gen = torch.Generator().manual_seed(rows)
    x, y = torch.randn(rows, *row, generator=gen) * 3, torch.randint(0, 3, (rows,), generator=gen)
    losses = sample_losses("cross_entropy")
    clipper = FastClipper(forward, losses)
    start = {k: torch.full_like(v, 0.5) for k, v in params.items()}
    fast_into = {k: v.clone() for k, v in start.items()}
    exact_into = {k: v.clone() for k, v in start.items()}
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    _, fast_norms, fast_losses = clipper.clipped_sum(leaves, x, y, 0.1, scale=2.0, into=fast_into)
    _, norms, exact_losses = exact_clipped_sum(forward, losses, params, x, y, 0.1, scale=2.0, into=exact_into)
    assert fast_norms.shape == norms.shape == (rows,)
    assert fast_losses.shape == exact_losses.shape == (rows,)
    torch.testing.assert_close(fast_norms, norms, rtol=1e-4, atol=1e-6)
    total = torch.zeros(())
    for k in start:
        torch.testing.assert_close(fast_into[k], exact_into[k], rtol=1e-4, atol=1e-6)
        total = total + (fast_into[k] - start[k]).square().sum()
    if rows == 0:
        assert float(total) == 0.0
    else:  # each row clipped to 0.1 (its norm is above it), times the scale 2
        assert bool((norms > 0.1).all())
        assert float(total.sqrt()) <= 2.0 * 0.1 * rows + 1e-5
        if rows == 1:
            torch.testing.assert_close(total.sqrt(), torch.tensor(0.2), rtol=1e-4, atol=1e-6)


class Cancelling(nn.Module):
    """One Linear fed the same row twice (a sequence of two steps), its output ``o1 + s (o1 - o2)``: equal to
    ``o1``, but the two steps' backprops are ``(1 + s) g`` and ``-s g``. The row's gradient is ``g a^T``; a norm
    computed without it sums terms ``s^2`` larger, which at ``s`` ~ 1e5..1e7 (a raw feature squared) cancel
    to anything in float32, zero included. ``feature`` picks ``s``: one raw feature squared, or the row's
    squared length."""

    def __init__(self, feature=23):
        super().__init__()
        self.lin = nn.Linear(30, 2)
        self.feature = feature

    def forward(self, x):
        u = x.unsqueeze(1)
        o = self.lin(torch.cat([u, u], dim=1))
        o1, o2 = o[:, 0], o[:, 1]
        if self.feature is None:
            s = (x * x).sum(1, keepdim=True)
        else:
            s = x[:, self.feature : self.feature + 1] * x[:, self.feature : self.feature + 1]
        return o1 + s * (o1 - o2)


def raw_breast_cancer():
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)


def contributions(clipper, params, x, y, clip):
    """Each row's own contribution to the clipped sum: the sum of a batch of that row alone (the graph treats
    rows independently, so it is the row's share of any batch's sum)."""
    out = []
    for i in range(len(x)):
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        total, _, _ = clipper.clipped_sum(leaves, x[i : i + 1], y[i : i + 1], clip)
        out.append(float(torch.sqrt(sum(t.double().square().sum() for t in total.values()))))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("feature", [23, None])
def test_a_sequence_whose_steps_cancel_adds_at_most_the_bound_per_row(feature):
    model = Cancelling(feature)
    graph = load_graph(export_graph(model, torch.zeros(2, 30)))
    assert graph.rows_independent  # so the runner would take the fast way when the probe agrees
    forward = lambda p, x: torch.func.functional_call(graph.module, p, (x,))  # noqa: E731
    params = initialise(graph, "default", seed=1)
    x, y = raw_breast_cancer()  # not standardised: s is 1e5..1e7 where the probe's rows make it ~1
    clipper = FastClipper(forward, sample_losses("cross_entropy"))
    clip = 1.0
    each = contributions(clipper, params, x, y, clip)
    assert float(each.max()) <= clip * (1 + 1e-3), f"{int((each > clip * 1.001).sum())} rows add more than the bound"
    # the whole batch's norms are those of what each row adds: the sum of the batch is the rows' shares summed
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    total, norms, _ = clipper.clipped_sum(leaves, x, y, clip)
    assert torch.isfinite(norms).all()
    assert float(torch.sqrt(sum(t.double().square().sum() for t in total.values()))) <= len(x) * clip * (1 + 1e-3)


def test_linear_layers_on_sequences_are_clipped_from_materialised_gradients():
    from paitient.rules.clipping import linear_sample_grads, linear_sample_norms

    gen = torch.Generator().manual_seed(0)
    a, g = torch.randn(5, 3, 4, generator=gen), torch.randn(5, 3, 2, generator=gen)
    weight, bias = linear_sample_grads(a, g, True)
    for i in range(5):
        torch.testing.assert_close(weight[i], sum(torch.outer(g[i, t], a[i, t]) for t in range(3)))
        torch.testing.assert_close(bias[i], g[i].sum(0))
    with pytest.raises(ValueError, match="linear_sample_grads"):
        linear_sample_norms(a, g, True)  # no norm of a sequence's gradient without the gradient


class Infinite(nn.Module):
    """A logistic regression whose output is infinite for a row whose first feature is above 27 (a mean radius
    only outliers have): ``relu(x_0 - 27) * 1e30 * 1e30``. Such a row's gradient is NaN; one NaN in the sum
    made every weight NaN, so whether the weights were numbers told whether the dataset held such a row."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(30, 2)

    def forward(self, x):
        return self.lin(x) + torch.relu(x[:, 0:1] - 27.0) * 1e30 * 1e30


@pytest.mark.parametrize("way", ["fast", "exact"])
def test_a_row_whose_gradient_is_not_finite_adds_nothing(way):
    graph = load_graph(export_graph(Infinite(), torch.zeros(2, 30)))
    forward = lambda p, x: torch.func.functional_call(graph.module, p, (x,))  # noqa: E731
    params = initialise(graph, "default", seed=1)
    x, y = raw_breast_cancer()
    outliers = x[:, 0] > 27
    assert 0 < int(outliers.sum()) < 5
    losses = sample_losses("cross_entropy")

    def clipped(xs, ys):
        if way == "exact":
            return exact_clipped_sum(forward, losses, params, xs, ys, 1.0)[0]
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        return FastClipper(forward, losses).clipped_sum(leaves, xs, ys, 1.0)[0]

    with_them, without = clipped(x, y), clipped(x[~outliers], y[~outliers])
    for k in without:
        assert torch.isfinite(with_them[k]).all()
        torch.testing.assert_close(with_them[k], without[k], rtol=1e-5, atol=1e-4)
