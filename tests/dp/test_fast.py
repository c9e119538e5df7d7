"""paitient's fast clipping gives exactly Opacus' clipped gradient, and Gaussian noise of the right size."""

import copy

import pytest
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from paitient.kernel.dp.fast import FastClipper, FastDPOptimizer, FastPathError, linear_layers


class SeqModel(nn.Module):
    """Linear layers on (batch, time, features) input, and one without bias."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 12)
        self.b = nn.Linear(12, 3, bias=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).mean(1)


def opacus_grads(model, x, y, *, clip, reduction, expected):
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    dl = DataLoader(TensorDataset(x, y), batch_size=expected)
    m, opt, _ = PrivacyEngine().make_private(
        module=m,
        optimizer=opt,
        data_loader=dl,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        poisson_sampling=False,
        loss_reduction=reduction,
    )
    opt.zero_grad()
    nn.CrossEntropyLoss(reduction=reduction)(m(x), y).backward()
    opt.pre_step()
    return [p.grad.clone() for p in m.parameters()], opt.expected_batch_size


def fast_grads(model, x, y, *, clip, reduction, expected, noise=0.0, generator=None):
    m = copy.deepcopy(model)
    layers, why = linear_layers(m, set(m.parameters()))
    assert layers, why
    clipper = FastClipper(m, layers)
    nn.CrossEntropyLoss(reduction=reduction)(m(x), y).backward()
    clipper.private_grads(
        noise_multiplier=noise,
        max_grad_norm=clip,
        expected_batch_size=expected,
        loss_reduction=reduction,
        generator=generator,
    )
    return [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("clip", [0.05, 1.0, 100.0])  # most, some, no samples clipped
def test_mlp_gradient_equals_opacus(reduction, clip):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ELU(), nn.Linear(32, 4))
    x, y = torch.randn(40, 10) * 2, torch.randint(0, 4, (40,))
    want, expected = opacus_grads(model, x, y, clip=clip, reduction=reduction, expected=16)
    got = fast_grads(model, x, y, clip=clip, reduction=reduction, expected=expected)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_sequence_input_and_no_bias_equal_opacus():
    torch.manual_seed(2)
    model = SeqModel()
    x, y = torch.randn(24, 5, 6), torch.randint(0, 3, (24,))
    want, expected = opacus_grads(model, x, y, clip=0.3, reduction="mean", expected=8)
    got = fast_grads(model, x, y, clip=0.3, reduction="mean", expected=expected)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


class Normed(nn.Module):
    """Linear layers with LayerNorm, GroupNorm and RMSNorm between them, on 2-D and 3-D input."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8)
        self.b = nn.Linear(8, 8)
        self.gn = nn.GroupNorm(4, 8)
        self.rms = nn.RMSNorm(8)
        self.c = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.ln(self.a(x)))
        h = self.b(h)
        h = self.gn(h.transpose(1, 2)).transpose(1, 2) if h.dim() == 3 else self.gn(h)
        return self.c(self.rms(h)).reshape(len(x), -1, 3).mean(1)


@pytest.mark.parametrize("shape", [(30, 6), (12, 4, 6)])
def test_normalisation_layers_beside_linear_equal_opacus(shape):
    torch.manual_seed(4)
    model = Normed()
    x, y = torch.randn(*shape) * 2, torch.randint(0, 3, (shape[0],))
    want, expected = opacus_grads(model, x, y, clip=0.2, reduction="mean", expected=10)
    got = fast_grads(model, x, y, clip=0.2, reduction="mean", expected=expected)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_noise_has_the_dp_sgd_standard_deviation():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(50, 200), nn.ReLU(), nn.Linear(200, 2))
    x, y = torch.randn(32, 50), torch.randint(0, 2, (32,))
    clean = fast_grads(model, x, y, clip=1.0, reduction="mean", expected=32)
    noisy = fast_grads(
        model, x, y, clip=1.0, reduction="mean", expected=32, noise=1.3, generator=torch.Generator().manual_seed(0)
    )
    diff = torch.cat([(n - c).flatten() for n, c in zip(noisy, clean, strict=True)])
    assert diff.std().item() == pytest.approx(1.3 * 1.0 / 32, rel=0.02)  # sigma * C / E
    assert abs(diff.mean().item()) < 3 * 1.3 / 32 / diff.numel() ** 0.5


def test_empty_batch_gives_noise_only_and_counts():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = FastDPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        FastClipper(model, linear_layers(model, set(model.parameters()))[0]),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=8,
    )
    seen = []
    opt.after_step = seen.append
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.CrossEntropyLoss()(model(torch.empty(0, 4)), torch.empty(0, dtype=torch.long))
    loss.backward()  # nan loss over nothing; no sample contributes a gradient
    opt.step()
    assert seen == [0]
    for b, p in zip(before, model.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), b)


def test_layer_used_twice_is_refused():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    FastClipper(model, linear_layers(model, set(model.parameters()))[0])
    with pytest.raises(FastPathError, match="ran twice in one forward pass.*mode='hooks'"):
        model(torch.randn(3, 4))


def test_other_trainable_layers_are_not_fast():
    model = nn.Sequential(nn.Linear(4, 4), nn.Embedding(3, 4), nn.Linear(4, 2))
    layers, why = linear_layers(model, set(model.parameters()))
    assert layers == [] and "layer '1' (Embedding) is neither nn.Linear nor a normalisation layer" in why
    frozen = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    frozen[0].bias.requires_grad_(False)
    assert "partly frozen" in linear_layers(frozen, set(frozen.parameters()))[1]


def test_detach_restores_plain_training():
    model = nn.Sequential(nn.Linear(4, 2))
    clipper = FastClipper(model, linear_layers(model, set(model.parameters()))[0])
    clipper.detach()
    nn.CrossEntropyLoss()(model(torch.randn(5, 4)), torch.zeros(5, dtype=torch.long)).backward()
    assert model[0].weight.grad is not None and "forward" not in model[0].__dict__


class Cancelling(nn.Module):
    """A Linear fed the same row twice, its output ``o1 + s (o1 - o2)`` with ``s`` a feature squared: the steps'
    backprops ``(1 + s) g`` and ``-s g`` cancel, and a norm computed without the row's gradient rounds to
    anything (zero: the row unclipped) at ``s`` of raw clinical features."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(30, 2)

    def forward(self, x):
        u = x.unsqueeze(1)
        o = self.lin(torch.cat([u, u], dim=1))
        o1, o2 = o[:, 0], o[:, 1]
        s = x[:, 23:24] * x[:, 23:24]
        return o1 + s * (o1 - o2)


def test_a_sequence_whose_steps_cancel_adds_at_most_the_bound_per_sample():
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(1)
    model = Cancelling()
    clip = 1.0
    worst = 0.0
    for i in range(0, len(x), 3):  # each sample alone: its clipped gradient is what it adds to any batch
        grads = fast_grads(model, x[i : i + 1], y[i : i + 1], clip=clip, reduction="sum", expected=1)
        worst = max(worst, float(torch.sqrt(sum(g.double().square().sum() for g in grads))))
    assert worst <= clip * (1 + 1e-3)


def test_a_sample_whose_gradient_is_not_finite_adds_nothing():
    """A sample whose output is infinite has a NaN gradient: it adds nothing, and the others' clipped sum is
    what it is without it (one NaN made every gradient NaN)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    bad = x.clone()
    bad[4] = float("inf")
    others = torch.arange(12) != 4
    got = fast_grads(model, bad, y, clip=0.5, reduction="sum", expected=12)
    want = fast_grads(model, x[others], y[others], clip=0.5, reduction="sum", expected=12)
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
