"""The padded step: padding rows weigh nothing, the result is the unpadded step's, a sample over the capacity
runs unpadded, and when a step is captured as a CUDA graph, warm-up, capture, replay and the fallback come in
the right order. This machine has no GPU: the capture itself is checked on one by benchmarks/gpu_check.sh."""

import math

import pytest
import torch
from torch import nn

from paitient.kernel.jobs.export import export_graph
from paitient.services.jobs import train as train_module
from paitient.services.jobs.graph import initialise, load_graph
from paitient.services.jobs.padded import WARMUP, PaddedStep, Stepper, capacity, slots
from paitient.services.jobs.persample import FastClipper, exact_clipped_sum
from paitient.services.jobs.runner import _trained_how
from paitient.services.jobs.train import Plan, TrainError, TrainSpec, poisson_rows, sample_losses, step_mode, train

MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)), (5,)),
    "cnn": (
        lambda: nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 3 * 3, 3)),
        (1, 8, 8),
    ),
}


def spec(**change) -> TrainSpec:
    base = dict(epochs=1, batch_size=24, lr=0.5, optimizer="sgd", max_grad_norm=0.5, target_epsilon=1.0,
                delta=1e-5, accountant="prv", loss="cross_entropy", seed=3)  # fmt: skip
    return TrainSpec(**{**base, **change})


def model(name, seed=0):
    make, row = MODELS[name]
    torch.manual_seed(seed)
    g = load_graph(export_graph(make(), torch.zeros(2, *row)))
    return g, row, (lambda p, x: torch.func.functional_call(g.module, p, (x,)))


def data(row, n=240, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *row, generator=gen) * 3, torch.randint(0, 3, (n,), generator=gen)


def test_the_capacity_is_the_expected_size_and_five_deviations_in_multiples_of_8():
    assert capacity(1000, 1.0) == 1000 and capacity(10, 0.9) == 10  # never more than the rows
    for n, q in ((200_000, 512 / 200_000), (60_000, 4096 / 60_000), (455, 64 / 455), (10_000, 1e-4)):
        cap = capacity(n, q)
        mean, sd = n * q, math.sqrt(n * q * (1 - q))
        assert cap % 8 == 0 and mean + 5 * sd <= cap < mean + 5 * sd + 8
    assert capacity(200_000, 512 / 200_000) == 632  # 512 + 5 * 22.6, rounded up
    # the share of Poisson samples over it is far below one in a thousand
    gen = torch.Generator().manual_seed(0)
    over = sum(len(poisson_rows(2000, 0.01, gen)) > capacity(2000, 0.01) for _ in range(3000))
    assert over <= 1


def test_the_slots_hold_the_rows_then_zeros_then_their_count():
    assert slots(torch.tensor([3, 5, 9]), 5).tolist() == [3, 5, 9, 0, 0, 3]
    assert slots(torch.zeros(0, dtype=torch.long), 2).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="4 rows do not fit a step of 3"):
        slots(torch.arange(4), 3)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("clipping", ["fast", "exact"])
def test_padding_rows_weighted_0_add_nothing_to_the_clipped_sum(name, clipping):
    """The sum over 11 real rows and 9 padding rows with weight 0 is the sum over the 11 rows: padding rows
    that are other rows (of larger gradients) change nothing, and the norms of the real rows are theirs."""
    g, row, forward = model(name)
    params = initialise(g, "default", seed=2)
    x, y = data(row, n=20)
    x[11:] *= 50  # the padding rows' gradients are large: a weight that leaked would show
    weights = torch.cat([torch.ones(11), torch.zeros(9)])
    losses_of = sample_losses("cross_entropy")
    start = {k: torch.full_like(v, 0.25) for k, v in params.items()}
    padded, alone = ({k: v.clone() for k, v in start.items()} for _ in range(2))

    def clipped(xb, yb, into, w):
        if clipping == "exact":
            return exact_clipped_sum(forward, losses_of, params, xb, yb, 0.3, scale=0.5, into=into, weights=w)
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        return FastClipper(forward, losses_of).clipped_sum(leaves, xb, yb, 0.3, scale=0.5, into=into, weights=w)

    _, norms_padded, losses_padded = clipped(x, y, padded, weights)
    _, norms_alone, losses_alone = clipped(x[:11], y[:11], alone, None)
    for k in start:
        torch.testing.assert_close(padded[k], alone[k], rtol=1e-5, atol=1e-6)
        assert not torch.equal(alone[k], start[k])
    torch.testing.assert_close(norms_padded[:11], norms_alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses_padded[:11], losses_alone)
    assert float(norms_padded[11:].max()) > 10 * float(norms_alone.max())  # the padding rows are there, weighted 0


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("clipping", ["auto", "exact"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_padded_run_is_the_unpadded_run(name, clipping, optimizer):
    """The same seed, so the same samples and noise: the noised, clipped sums over the expected batch size,
    and so the parameters after 12 steps, are the unpadded run's to float rounding; so are the losses."""
    g, row, forward = model(name)
    start = initialise(g, "default", seed=4)
    x, y = data(row)
    the_plan = Plan(sample_rate=0.1, steps=12, noise_multiplier=0.8)
    s = spec(optimizer=optimizer, lr=0.05 if optimizer == "adam" else 0.5)
    eager = train(forward, start, x, y, s, the_plan=the_plan, clipping=clipping, step="eager")
    padded = train(forward, start, x, y, s, the_plan=the_plan, clipping=clipping, step="padded")
    assert padded.capacity == capacity(240, 0.1) == 48 and eager.capacity == 0 and padded.overflow == 0
    assert padded.clipping == eager.clipping == ("fast" if clipping == "auto" else "exact")
    assert not padded.graph and not eager.graph and padded.graph_failed == ""
    for k in start:
        assert not torch.equal(eager.params[k], start[k])
        torch.testing.assert_close(padded.params[k], eager.params[k], rtol=1e-5, atol=1e-5)
    assert padded.losses == pytest.approx(eager.losses, rel=1e-6)
    assert padded.epsilon == eager.epsilon


def test_samples_over_the_capacity_run_unpadded_and_none_is_cut(monkeypatch):
    """With a capacity of the expected size, about half the samples are larger: they run unpadded (counted),
    the others padded, and the parameters are the unpadded run's; the losses count every sampled row."""
    g, row, forward = model("mlp")
    start = initialise(g, "default", seed=4)
    x, y = data(row)
    the_plan = Plan(sample_rate=0.1, steps=20, noise_multiplier=0.5)
    monkeypatch.setattr(train_module, "capacity", lambda n, q: round(n * q))
    eager = train(forward, start, x, y, spec(), the_plan=the_plan, step="eager")
    padded = train(forward, start, x, y, spec(), the_plan=the_plan, step="padded")
    gen = torch.Generator().manual_seed(3)
    sizes = []
    for _ in range(20):
        sizes.append(len(poisson_rows(240, 0.1, gen)))
        torch.empty(sum(v.numel() for v in start.values())).normal_(generator=gen)  # the step's noise
    assert padded.capacity == 24 and padded.overflow == sum(s > 24 for s in sizes) and 0 < padded.overflow < 20
    for k in start:
        torch.testing.assert_close(padded.params[k], eager.params[k], rtol=1e-5, atol=1e-5)
    assert padded.losses == pytest.approx(eager.losses, rel=1e-6)


def test_the_step_mode_is_a_graph_on_cuda_and_eager_on_the_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert step_mode("auto", cpu) == "eager" and step_mode("auto", cuda) == "graph"
    assert step_mode("padded", cpu) == "padded" and step_mode("eager", cuda) == "eager"
    assert step_mode("graph", cuda) == "graph"
    with pytest.raises(TrainError, match="step graph captures a CUDA graph: it needs device cuda"):
        step_mode("graph", cpu)
    with pytest.raises(TrainError, match="step must be one of auto, eager, padded, graph"):
        step_mode("compiled", cpu)
    g, row, forward = model("mlp")
    x, y = data(row)
    with pytest.raises(TrainError, match="needs device cuda"):
        train(forward, initialise(g, "default", 0), x, y, spec(), step="graph", device="cpu")


class CpuGraph(Stepper):
    """The stepper with its three device parts done on the CPU: the 'graph' runs the padded step's work again
    at each replay (what a CUDA graph replays), or capturing fails when ``broken`` says so."""

    def __init__(self, *args, broken: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.broken = broken
        self.calls: list[str] = []

    def _warm(self, rows):
        self.calls.append("warm")
        self.padded(rows)

    def _capture(self):
        self.calls.append("capture")
        if self.broken:
            raise RuntimeError(self.broken)
        return self.padded

    def _replay(self, rows):
        self.calls.append("replay")
        self.padded.load(rows)
        self.graph.run()


def stepper_over(name, broken=""):
    g, row, forward = model(name)
    leaves = {k: v.clone().requires_grad_(True) for k, v in initialise(g, "default", seed=4).items()}
    x, y = data(row)
    sizes = [v.numel() for v in leaves.values()]
    noise = torch.empty(sum(sizes))
    views = {k: p.view(leaves[k].shape) for k, p in zip(leaves, torch.split(noise, sizes), strict=True)}
    gen = torch.Generator().manual_seed(0)
    losses_of = sample_losses("cross_entropy")
    padded = PaddedStep(
        forward, losses_of, leaves, torch.optim.SGD(list(leaves.values()), lr=0.5), x, y, capacity=8,
        max_grad_norm=0.5, scale=1 / 6, noise_std=0.0, noise=noise, views=views, noise_gen=gen,
        loss_sum=torch.zeros((), dtype=torch.float64), fast=FastClipper(forward, losses_of),
    )  # fmt: skip
    unpadded: list[list[int]] = []
    stepper = CpuGraph(padded, lambda rows: unpadded.append(rows.tolist()), capture=True, broken=broken)
    return stepper, padded, unpadded


def test_a_graphed_run_warms_up_captures_once_replays_and_sends_overflow_unpadded():
    stepper, padded, unpadded = stepper_over("mlp")
    before = {k: v.detach().clone() for k, v in padded.leaves.items()}
    small, large = torch.arange(5), torch.arange(9)
    for rows in (small, small, large, small, small, small, large, small):
        stepper(rows)
    assert stepper.calls == ["warm"] * WARMUP + ["capture", "replay", "replay", "replay"]
    assert unpadded == [list(range(9))] * 2 and stepper.overflow == 2
    assert stepper.captured and stepper.replays == 3 and stepper.failed == ""
    # 6 padded steps of 5 rows each: the losses added are the real rows' only
    assert all(not torch.equal(v, before[k]) for k, v in padded.leaves.items())
    assert float(padded.loss_sum) > 0 and padded.fast is not None


def test_a_capture_that_fails_leaves_the_graph_off_and_the_run_goes_on_unpadded():
    stepper, padded, unpadded = stepper_over("cnn", broken="operation not permitted when stream is capturing")
    rows = [torch.tensor([1, 4, 7]), torch.tensor([0, 2]), torch.tensor([5]), torch.tensor([3, 6]), torch.tensor([8])]
    for r in rows:
        stepper(r)
    assert stepper.calls == ["warm"] * WARMUP + ["capture"]  # tried once, never again
    assert unpadded == [[3, 6], [8]] and stepper.overflow == 0
    assert not stepper.captured and stepper.failed == "RuntimeError: operation not permitted when stream is capturing"


def test_without_capture_the_stepper_runs_every_fitting_step_padded():
    stepper, padded, unpadded = stepper_over("mlp")
    stepper.capture = False
    for rows in (torch.arange(3), torch.arange(12), torch.arange(8)):
        stepper(rows)
    assert stepper.calls == [] and unpadded == [list(range(12))] and stepper.overflow == 1
    assert not stepper.captured


def test_the_audit_record_keeps_how_a_job_trained_only_in_the_allowed_values():
    assert _trained_how({"device": "cuda", "clipping": "fast", "graph": True, "other": 1}) == {
        "device": "cuda",
        "clipping": "fast",
        "graph": True,
    }
    assert _trained_how({"device": "cpu", "clipping": "exact", "graph": False}) == {
        "device": "cpu",
        "clipping": "exact",
        "graph": False,
    }
    # JSON's 1 and "true" are not a boolean; an unknown device is left out
    assert _trained_how({"device": "tpu", "graph": 1}) == {} and _trained_how({"graph": "true"}) == {}
