"""The model travels as a graph: checked as untrusted input, built without unpickling, trained from the runner's
own initial values."""

import json
import pickle

import pytest
import torch
from torch import nn

from paitient.kernel.jobs.export import ModelNotExportable, export_graph
from paitient.services.jobs.graph import ALLOWED_OPS, GraphRefused, initialise, load_graph

MARK = 123.456


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(30, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 2))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 13 * 13, 10))


@pytest.mark.parametrize(("model", "row"), [(mlp, (30,)), (cnn, (1, 28, 28))])
def test_a_model_goes_as_a_graph_and_runs_on_any_batch_size(model, row):
    graph = load_graph(export_graph(model(), torch.zeros(2, *row)))
    params = initialise(graph, "default", seed=1)
    out = torch.func.functional_call(graph.module, params, (torch.randn(7, *row),))
    assert out.shape[0] == 7 and graph.input_shape == row
    assert set(params) == set(graph.params) and all(p.dtype == torch.float32 for p in params.values())
    assert graph.ops <= ALLOWED_OPS and len(graph.sha256) == 64


def test_values_set_in_the_notebook_never_leave_it():
    model = mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(MARK)  # data written into the initial weights
    program = export_graph(model, torch.zeros(2, 30))
    assert b"123.4" not in program and b"state_dict" not in program
    graph = load_graph(program)
    params = initialise(graph, "default", seed=1)
    assert not any(torch.isclose(p, torch.tensor(MARK)).any() for p in params.values())
    again = initialise(graph, "default", seed=1)
    assert all(torch.equal(params[k], again[k]) for k in params)  # the runner's seed decides
    assert not torch.equal(initialise(graph, "default", seed=2)["0.weight"], params["0.weight"])


def test_the_graph_is_built_without_unpickling_anything(monkeypatch):
    program = export_graph(mlp(), torch.zeros(2, 30))

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was read")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert load_graph(program).params["0.weight"][0] == (16, 30)


def test_mutable_buffers_are_refused():
    model = nn.Sequential(nn.Linear(30, 16), nn.BatchNorm1d(16), nn.Linear(16, 2))
    with pytest.raises(GraphRefused, match="buffers .*use LayerNorm or GroupNorm"):
        load_graph(export_graph(model, torch.zeros(2, 30)))


def test_a_custom_operator_is_refused():
    @torch.library.custom_op("paitient_test::leak", mutates_args=())
    def leak(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @leak.register_fake
    def _(x):
        return torch.empty_like(x)

    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(30, 2)

        def forward(self, x):
            return leak(self.fc(x))

    with pytest.raises(GraphRefused, match="operation 'torch.ops.paitient_test.leak.default' is not one the runner"):
        load_graph(export_graph(Leaky(), torch.zeros(2, 30)))


def test_a_python_callback_is_refused():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(30, 2)

        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda v: self.fc(v), lambda v: self.fc(-v), (x,))

    try:
        program = export_graph(Branchy(), torch.zeros(2, 30))
    except ModelNotExportable:
        return  # refused already in the kernel: nothing reaches the runner
    with pytest.raises(GraphRefused, match="is not one the runner trains"):
        load_graph(program)


def edited(program: bytes, change) -> bytes:
    doc = json.loads(program)
    change(doc)
    return json.dumps(doc).encode()


def test_an_edited_graph_cannot_call_other_operators_or_hide_expressions():
    program = export_graph(mlp(), torch.zeros(2, 30))

    def call_system(doc):
        doc["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.aten._foreach_copy_.default"

    with pytest.raises(GraphRefused, match="_foreach_copy_"):
        load_graph(edited(program, call_system))

    def expression(doc):
        tv = doc["graph_module"]["graph"]["tensor_values"]["input"]
        tv["sizes"][0]["as_expr"]["expr_str"] = "__import__('os').system('id')"

    with pytest.raises(GraphRefused, match="expressions other than the batch size"):
        load_graph(edited(program, expression))

    def structure(doc):
        doc["graph_module"]["module_call_graph"][0]["signature"]["in_spec"] = '[1, {"type": "os.system"}]'

    with pytest.raises(GraphRefused, match="one tensor and return one tensor"):
        load_graph(edited(program, structure))


def test_garbage_and_oversize_are_refused():
    with pytest.raises(GraphRefused, match="not JSON"):
        load_graph(b"\x80\x04pickle")
    with pytest.raises(GraphRefused, match="more than 100"):
        load_graph(b"{" + b" " * 200 + b"}", max_bytes=100)
    with pytest.raises(GraphRefused, match="not an exported program"):
        load_graph(b'{"graph_module": {}}')


def test_per_sample_gradients_on_the_loaded_graph_match_a_loop():
    graph = load_graph(export_graph(mlp(), torch.zeros(2, 30)))
    params = initialise(graph, "default", seed=3)
    x, y = torch.randn(6, 30), torch.tensor([0, 1, 1, 0, 1, 0])

    def loss(p, xi, yi):
        out = torch.func.functional_call(graph.module, p, (xi.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(out, yi.unsqueeze(0))

    batched = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(len(x)):
        one = torch.func.grad(loss)(params, x[i], y[i])
        assert all(torch.allclose(batched[k][i], one[k], atol=1e-6) for k in params)
