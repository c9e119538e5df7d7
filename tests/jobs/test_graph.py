"""The model travels as a graph: checked as untrusted input, built without unpickling or running anything it
carries, trained from the runner's own initial values.

``kernel`` stands for what a notebook does (export), ``runner`` for what the training runner does (load,
initialise, run)."""

import base64
import copy
import hashlib
import json
import math
import os
import pickle
import random
import re
import struct

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from paitient.kernel.jobs.export import ModelNotExportable, export_graph
from paitient.services.jobs import graph as graph_mod
from paitient.services.jobs.graph import ALLOWED_OPS, Graph, GraphRefused, initialise, load_graph

MARK = 123.456
SECRET = "patient 4711 HIV+"


def kernel(model: nn.Module, example: torch.Tensor) -> bytes:
    return export_graph(model, example)


def runner(program: bytes) -> Graph:
    return load_graph(program)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 13 * 13, 10)
    )


def normed() -> nn.Module:
    return nn.Sequential(nn.Linear(30, 16), nn.LayerNorm(16), nn.GELU(), nn.Dropout(0.2), nn.Linear(16, 2))


class Sequence(nn.Module):
    """Tokens -> embedding -> 1-D convolution -> group norm -> mean over positions -> classes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8, padding_idx=0)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens).transpose(1, 2)
        return self.out(nn.functional.silu(self.norm(self.conv(h))).mean(-1))


class Attention(nn.Module):
    """One head of self-attention written out: embedding, scores, softmax, weighted values, mean, classes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        scores = self.q(h) @ self.k(h).transpose(1, 2) / math.sqrt(8)
        return self.out((scores.softmax(-1) @ self.v(h)).mean(1))


def tanh_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(30, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 16), nn.GELU("tanh"), nn.Linear(16, 2)
    )


MODELS = {
    "mlp": (mlp, lambda n: torch.randn(n, 30), 2),
    "cnn": (cnn, lambda n: torch.randn(n, 1, 28, 28), 10),
    "layer_norm": (normed, lambda n: torch.randn(n, 30), 2),
    "sequence": (Sequence, lambda n: torch.randint(0, 50, (n, 12)), 3),
    "attention": (Attention, lambda n: torch.randint(0, 20, (n, 6)), 3),
    "tanh": (tanh_mlp, lambda n: torch.randn(n, 30), 2),
}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_a_model_goes_as_a_graph_and_runs_on_any_batch_size(kind):
    make, rows, classes = MODELS[kind]
    model = make()
    program = kernel(model, rows(2))
    graph = runner(program)
    params = initialise(graph, "default", seed=1)
    x = rows(7)
    out = torch.func.functional_call(graph.module, params, (x,))
    assert out.shape == (7, classes)
    assert graph.input_shape == tuple(x.shape[1:]) and graph.input_dtype == x.dtype
    assert set(params) == set(graph.params) == {k for k, _ in model.named_parameters()}
    assert all(params[k].shape == p.shape and p.dtype == torch.float32 for k, p in model.named_parameters())
    assert graph.ops <= ALLOWED_OPS and graph.sha256 == hashlib.sha256(program).hexdigest()
    evaluated = torch.func.functional_call(graph.eval_module, params, (x,))
    assert evaluated.shape == (7, classes)


def test_the_kernel_leaves_the_model_as_it_was():
    model = cnn().eval()
    kernel(model, torch.zeros(2, 1, 28, 28))
    assert not model.training and model[1].inplace  # exported in training mode, in-place ReLU out of place


def test_dropout_is_on_for_training_and_off_for_evaluation():
    graph = runner(kernel(normed(), torch.zeros(2, 30)))
    assert "torch.ops.aten.dropout.default" in graph.ops
    params, x = initialise(graph, "default", seed=1), torch.randn(64, 30)

    def run(module):
        return torch.func.functional_call(module, params, (x,))

    assert not torch.equal(run(graph.module), run(graph.module))
    assert torch.equal(run(graph.eval_module), run(graph.eval_module))
    # the trainer's per-sample gradients draw a mask per row
    grads = torch.func.vmap(
        torch.func.grad(lambda p, xi: torch.func.functional_call(graph.module, p, (xi.unsqueeze(0),)).sum()),
        in_dims=(None, 0),
        randomness="different",
    )(params, x[:4])
    assert all(torch.isfinite(g).all() for g in grads.values())


class Mixed(nn.Module):
    """Every initialisation rule: linear, convolution, norm, embedding, a bare matrix and a bare scale."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 6, padding_idx=3)
        self.conv = nn.Conv1d(6, 5, 3)
        self.norm = nn.LayerNorm(5)
        self.fc = nn.Linear(5, 64)
        self.matrix = nn.Parameter(torch.randn(64, 7))
        self.scale = nn.Parameter(torch.randn(7))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.embed(tokens).transpose(1, 2)).mean(-1)
        return (self.fc(self.norm(h)) @ self.matrix) * self.scale


def test_the_runners_initial_values_are_pytorchs_defaults_by_layer_kind():
    graph = runner(kernel(Mixed(), torch.zeros(2, 9, dtype=torch.long)))
    p = initialise(graph, "default", seed=7)

    def uniform_within(t, bound):
        return t.abs().max() <= bound and t.abs().max() > 0.8 * bound

    assert uniform_within(p["fc.weight"], 1 / math.sqrt(5)) and uniform_within(p["fc.bias"], 1 / math.sqrt(5))
    assert uniform_within(p["conv.weight"], 1 / math.sqrt(6 * 3)) and uniform_within(p["conv.bias"], 1 / math.sqrt(18))
    assert torch.equal(p["norm.weight"], torch.ones(5)) and torch.equal(p["norm.bias"], torch.zeros(5))
    assert abs(float(p["embed.weight"].std()) - 1) < 0.2 and torch.equal(p["embed.weight"][3], torch.zeros(6))
    assert uniform_within(p["matrix"], 1 / math.sqrt(64))  # x @ W: W is (fan_in, fan_out)
    assert torch.equal(p["scale"], torch.ones(7))
    assert graph.inits["fc.weight"].because == "linear.default:weight"
    # PyTorch's own layers draw from the same ranges
    reference = nn.Linear(5, 64)
    assert reference.weight.abs().max() <= 1 / math.sqrt(5)

    again, other = initialise(graph, "default", seed=7), initialise(graph, "default", seed=8)
    assert all(torch.equal(p[k], again[k]) for k in p)
    assert not torch.equal(p["fc.weight"], other["fc.weight"])
    assert all(not t.any() for t in initialise(graph, "zeros", seed=7).values())
    with pytest.raises(GraphRefused, match="scheme 'pretrained'"):
        initialise(graph, "pretrained", seed=7)


def floats_of(text: str) -> list[float]:
    return [float(b) for b in text.encode()]


def test_values_set_in_the_notebook_never_leave_it():
    model = normed()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(MARK)  # a recognisable value in every weight
        data = torch.tensor(floats_of(SECRET)[:16])
        model[0].bias.copy_(data)  # data written into a bias: the "data in initial weights" attack
    program = kernel(model, torch.zeros(2, 30))

    assert (
        b"123.45" not in program and struct.pack("<f", MARK) not in program and struct.pack("<d", MARK) not in program
    )
    assert SECRET.encode() not in program
    assert not any(struct.pack("<f", v) in program for v in data.tolist() if v)
    top = json.loads(program)
    assert set(top) == {
        "graph_module",
        "opset_version",
        "range_constraints",
        "schema_version",
        "verifiers",
        "torch_version",
        "guards_code",
    }  # no state_dict, constants or example_inputs

    params = initialise(runner(program), "default", seed=1)
    assert not any(torch.isclose(p, torch.tensor(MARK)).any() for p in params.values())
    assert not torch.isin(params["0.bias"], data).any()


class Evil:
    def __reduce__(self):
        return (exec, ("import os; os.environ['PAITIENT_UNPICKLED'] = '1'",))


def test_the_graph_is_built_without_unpickling_anything(monkeypatch):
    programs = [kernel(make(), rows(2)) for make, rows, _ in MODELS.values()]

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was read")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "load", refuse)
    for program in programs:
        assert runner(program).params

    # a document that carries a pickle where torch's own loader would read one is refused unread
    payload = base64.b64encode(pickle.dumps(Evil())).decode()
    for key in ("state_dict", "constants", "example_inputs"):
        with pytest.raises(GraphRefused, match="not an exported program's"):
            runner(edited(programs[0], lambda doc, key=key: doc.__setitem__(key, payload)))
    assert "PAITIENT_UNPICKLED" not in os.environ


# -- models that export into something the runner refuses ------------------------------------------------


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

    with pytest.raises(GraphRefused, match=r"'torch.ops.paitient_test.leak.default' at node 1 .*custom operator"):
        runner(kernel(Leaky(), torch.zeros(2, 30)))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(30, 2)

    def forward(self, x):
        return torch.cond(x.shape[0] > 4, lambda v: self.fc(v), lambda v: self.fc(-v), (x,))


class NoGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(30, 2)

    def forward(self, x):
        with torch.no_grad():
            return self.fc(x)


@pytest.mark.parametrize(
    ("model", "op"),
    [(Branchy, "torch.ops.higher_order.cond"), (NoGrad, "torch.ops.higher_order.wrap_with_set_grad_enabled")],
)
def test_a_python_callback_is_refused(model, op):
    with pytest.raises(GraphRefused, match=f"'{op}' at node .*higher-order operation holds Python functions"):
        runner(kernel(model(), torch.zeros(2, 30)))


def test_batchnorm_and_other_buffers_are_refused():
    model = nn.Sequential(nn.Linear(30, 16), nn.BatchNorm1d(16), nn.Linear(16, 2))
    with pytest.raises(GraphRefused, match=r"buffer \('1.running_mean'\).*use LayerNorm or GroupNorm"):
        runner(kernel(model, torch.zeros(2, 30)))

    class NotPersistent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(30, 2)
            self.register_buffer("mask", torch.ones(2), persistent=False)

        def forward(self, x):
            return self.fc(x) * self.mask

    with pytest.raises(GraphRefused, match=r"buffer \('mask'\)"):
        runner(kernel(NotPersistent(), torch.zeros(2, 30)))

    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(30, 2)
            self.shift = torch.full((2,), MARK)

        def forward(self, x):
            return self.fc(x) + self.shift

    with pytest.raises(GraphRefused, match="tensor constant the runner cannot recreate"):
        runner(kernel(Constant(), torch.zeros(2, 30)))


class InPlace(nn.Module):
    def __init__(self, where):
        super().__init__()
        self.fc, self.where = nn.Linear(30, 2), where

    def forward(self, x):
        if self.where == "input":
            x.mul_(2)  # changes the runner's rows
            return self.fc(x)
        return nn.functional.relu(self.fc(x), inplace=True)


@pytest.mark.parametrize(("where", "op"), [("input", "mul_.Tensor"), ("hidden", "relu_.default")])
def test_in_place_operations_are_refused(where, op):
    with pytest.raises(GraphRefused, match=rf"'torch.ops.aten.{op}' .*in-place operation"):
        runner(kernel(InPlace(where), torch.zeros(2, 30)))


def test_random_operations_other_than_dropout_are_refused():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(30, 2)

        def forward(self, x):
            return self.fc(x + torch.randn_like(x))

    with pytest.raises(GraphRefused, match="randn_like.*a random operation"):
        runner(kernel(Noisy(), torch.zeros(2, 30)))


# -- documents edited after export ------------------------------------------------------------------------


def edited(program: bytes, change) -> bytes:
    doc = json.loads(program)
    change(doc)
    return json.dumps(doc).encode()


def nodes(doc):
    return doc["graph_module"]["graph"]["nodes"]


@pytest.fixture(scope="module")
def program() -> bytes:
    return kernel(mlp(), torch.zeros(2, 30))


@pytest.mark.parametrize(
    "op", ["torch.ops.aten.copy_.default", "torch.ops.aten._foreach_copy_.default", "builtins.print"]
)
def test_an_edited_graph_cannot_call_other_operators(program, op):
    with pytest.raises(GraphRefused, match=f"'{op}' at node 1"):
        runner(edited(program, lambda doc: nodes(doc)[1].__setitem__("target", op)))


def test_an_edited_graph_cannot_smuggle_a_nested_graph_or_an_operator(program):
    doc = json.loads(program)
    meta = doc["graph_module"]["graph"]["tensor_values"]["linear"]
    hidden = {
        "inputs": [{"as_tensor": {"name": "z"}}],
        "outputs": [{"as_tensor": {"name": "w"}}],
        "nodes": [
            {
                "target": "torch.ops.aten.copy_.default",
                "inputs": [
                    {"name": "self", "arg": {"as_tensor": {"name": "z"}}, "kind": 1},
                    {"name": "src", "arg": {"as_tensor": {"name": "z"}}, "kind": 1},
                ],
                "outputs": [{"as_tensor": {"name": "w"}}],
                "metadata": {},
                "name": "w",
            }
        ],
        "tensor_values": {"z": meta, "w": meta},
        "sym_int_values": {},
        "sym_bool_values": {},
        "is_single_tensor_return": True,
    }
    relu = nodes(doc)[1]
    as_extra = copy.deepcopy(doc)
    nodes(as_extra)[1]["inputs"].append({"name": "extra", "arg": {"as_graph": {"name": "g", "graph": hidden}}})
    with pytest.raises(GraphRefused, match="passes 'extra', which torch.ops.aten.relu.default does not take"):
        runner(json.dumps(as_extra).encode())
    for arg in ({"as_graph": {"name": "g", "graph": hidden}}, {"as_operator": "torch.load"}, {"as_custom_obj": {}}):
        relu["inputs"][0]["arg"] = arg
        with pytest.raises(GraphRefused, match=f"argument 'self' is of kind '{next(iter(arg))}'"):
            runner(json.dumps(doc).encode())


@pytest.mark.parametrize("kind", ["buffer_mutation", "user_input_mutation", "parameter_mutation", "loss_output"])
def test_an_edited_graph_cannot_declare_mutations(program, kind):
    def mutate(doc):
        doc["graph_module"]["signature"]["output_specs"].append({kind: {"arg": {"name": "input"}, "buffer_name": "b"}})

    with pytest.raises(GraphRefused, match=f"changes its inputs, parameters or buffers in place.*{kind}"):
        runner(edited(program, mutate))


def rename_input(doc, name):
    """The user input's tensor renamed everywhere it appears (not the operator argument called ``input``)."""

    def walk(item):
        if isinstance(item, dict):
            if set(item) == {"name"} and item["name"] == "input":
                return {"name": name}
            return {
                (name if k == "input" and isinstance(v, dict) and "dtype" in v else k): walk(v) for k, v in item.items()
            }
        if isinstance(item, list):
            return [walk(v) for v in item]
        return item

    return walk(doc)


def test_names_are_never_code(program):
    # torch writes graph names into the Python source of the module it generates; the loader renames them
    payload = "x=__import__('os').environ.__setitem__('PAITIENT_INJECTED', '1')"
    graph = runner(json.dumps(rename_input(json.loads(program), payload)).encode())
    assert "PAITIENT_INJECTED" not in os.environ and "environ" not in graph.module.code
    out = torch.func.functional_call(graph.module, initialise(graph, "zeros", 0), (torch.zeros(3, 30),))
    assert out.shape == (3, 2)

    def parameter_name(doc):
        doc["graph_module"]["signature"]["input_specs"][0]["parameter"]["parameter_name"] = "w=print(1)"

    with pytest.raises(GraphRefused, match="parameter name 'w=print\\(1\\)' is not a dotted name"):
        runner(edited(program, parameter_name))


def test_sizes_are_the_batch_symbol_only(program):
    def expression(doc):
        doc["graph_module"]["graph"]["tensor_values"]["input"]["sizes"][0]["as_expr"]["expr_str"] = (
            "__import__('os').system('id')"
        )

    with pytest.raises(GraphRefused, match="expressions other than the batch size"):
        runner(edited(program, expression))

    def second_symbol(doc):
        doc["graph_module"]["graph"]["tensor_values"]["input"]["sizes"][1] = {
            "as_expr": {"expr_str": "Symbol('s9', positive=True, integer=True)", "hint": {"as_int": 30}}
        }

    with pytest.raises(GraphRefused, match="depend on more than the batch size"):
        runner(edited(program, second_symbol))

    def static_batch(doc):
        doc["graph_module"]["graph"]["tensor_values"]["input"]["sizes"][0] = {"as_int": 2}

    with pytest.raises(GraphRefused, match="first dimension must be the batch, exported as dynamic"):
        runner(edited(program, static_batch))


def test_one_tensor_in_one_tensor_out(program):
    def structure(doc):
        doc["graph_module"]["module_call_graph"][0]["signature"]["in_spec"] = '[1, {"type": "os.system"}]'

    with pytest.raises(GraphRefused, match="one tensor and return one tensor"):
        runner(edited(program, structure))

    def two_inputs(doc):
        gm = doc["graph_module"]
        gm["signature"]["input_specs"].append({"user_input": {"arg": {"as_tensor": {"name": "other"}}}})
        gm["graph"]["inputs"].append({"as_tensor": {"name": "other"}})
        gm["graph"]["tensor_values"]["other"] = gm["graph"]["tensor_values"]["input"]

    with pytest.raises(GraphRefused, match="takes 2 inputs; the runner gives it one tensor"):
        runner(edited(program, two_inputs))


def test_the_size_of_the_model_is_capped(program, monkeypatch):
    def huge(doc):
        meta = doc["graph_module"]["graph"]["tensor_values"]["p_0_weight"]
        meta["sizes"] = [{"as_int": 60_000}, {"as_int": 1_000}]

    with pytest.raises(GraphRefused, match=r"60,000,050 parameters, more than the runner trains \(50,000,000\)"):
        runner(edited(program, huge))
    monkeypatch.setattr(graph_mod, "MAX_NODES", 2)
    with pytest.raises(GraphRefused, match="more than 2 entries at graph.nodes"):
        runner(program)


def test_garbage_and_oversize_are_refused(program):
    with pytest.raises(GraphRefused, match="more than 100"):
        load_graph(b"{" + b" " * 200 + b"}", max_bytes=100)
    with pytest.raises(GraphRefused, match=f"{len(program)} bytes, more than 1000"):
        load_graph(program, max_bytes=1000)
    for garbage in (b"\x80\x04pickle", pickle.dumps(Evil()), b"[" * 200_000, b"\xff\xfe{", b""):
        with pytest.raises(GraphRefused, match="not JSON"):
            load_graph(garbage)
    assert "PAITIENT_UNPICKLED" not in os.environ
    for doc in (b"[]", b"null", b'{"graph_module": {}}', b'"text"'):
        with pytest.raises(GraphRefused, match="not an exported program's"):
            load_graph(doc)


def mutate(item, rng: random.Random):
    """One random change somewhere in a JSON document: a value replaced, a key dropped or an entry added."""
    path = []
    while isinstance(item, dict | list) and item and rng.random() < 0.85:
        key = rng.choice(list(item)) if isinstance(item, dict) else rng.randrange(len(item))
        path.append((item, key))
        item = item[key]
    if not path:
        return
    parent, key = path[-1]
    choice = rng.randrange(4)
    if choice == 0 and isinstance(parent, dict):
        del parent[key]
    elif choice == 1 and isinstance(parent, list):
        parent.append(copy.deepcopy(parent[key]))
    else:
        parent[key] = rng.choice([None, True, 0, -1, 2**70, 1.5, "", "input", [], {}, [1], {"as_int": 1}, "s0"])


def test_any_malformed_document_is_refused_not_crashed_on():
    program = kernel(cnn(), torch.zeros(2, 1, 28, 28))
    rng = random.Random(20261204)
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(300):
        doc = json.loads(program)
        for _ in range(rng.randint(1, 3)):
            mutate(doc, rng)
        try:
            load_graph(json.dumps(doc).encode())
            outcomes["loaded"] += 1
        except GraphRefused:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100


# -- the kernel's advice ---------------------------------------------------------------------------------


def test_the_kernel_says_what_to_change():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(30, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    class FixedBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(30, 2)

        def forward(self, x):
            return self.fc(x.view(2, 30))

    with pytest.raises(ModelNotExportable, match="branches on the values of a tensor"):
        kernel(DataDependent(), torch.zeros(2, 30))
    with pytest.raises(ModelNotExportable, match=r"fixes the batch size .* x.flatten\(1\)"):
        kernel(FixedBatch(), torch.zeros(2, 30))
    with pytest.raises(ModelNotExportable, match="at least 2 rows"):
        kernel(mlp(), torch.zeros(1, 30))
    with pytest.raises(ModelNotExportable, match="send a torch.nn.Module"):
        kernel(lambda x: x, torch.zeros(2, 30))  # type: ignore[arg-type]


# -- per-sample gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "cnn", "layer_norm"])
def test_per_sample_gradients_on_the_loaded_graph_match_a_loop(kind):
    make, rows, classes = MODELS[kind]
    graph = runner(kernel(make(), rows(2)))
    module = graph.eval_module  # without dropout, so that the loop and vmap see the same function
    params = initialise(graph, "default", seed=3)
    x, y = rows(6), torch.randint(0, classes, (6,))

    def loss(p, xi, yi):
        out = torch.func.functional_call(module, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    batched = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(len(x)):
        one = torch.func.grad(loss)(params, x[i], y[i])
        assert all(torch.allclose(batched[k][i], one[k], atol=1e-6) for k in params)


# -- attacks on the loader, each tried for real ----------------------------------------------------------

INJECTED = "PAITIENT_INJECTED"
CODE = f"x=__import__('os').environ.__setitem__('{INJECTED}', '1')"
SYMPY_CODE = f"__import__('os').environ.__setitem__('{INJECTED}', '1')"


@pytest.fixture(autouse=True)
def nothing_was_injected():
    yield
    assert INJECTED not in os.environ and "PAITIENT_UNPICKLED" not in os.environ


def rename_all(doc, new_name):
    """Every tensor and size name of the document, and every node's name, replaced by ``new_name(old)``;
    argument names (an operator's ``input``) and parameter names stay."""
    graph = doc["graph_module"]["graph"]
    names = set(graph["tensor_values"]) | set(graph.get("sym_int_values", {}))

    def walk(item):
        if isinstance(item, list):
            return [walk(v) for v in item]
        if not isinstance(item, dict):
            return item
        out = {}
        for k, v in item.items():
            if k in ("tensor_values", "sym_int_values"):
                out[k] = {new_name(n): walk(m) for n, m in v.items()}
            elif k == "name" and v in names and (set(item) == {"name"} or "target" in item):
                out[k] = new_name(v)
            elif k == "as_name" and v in names:
                out[k] = new_name(v)
            else:
                out[k] = walk(v)
        return out

    return walk(doc)


def outputs_agree(graph: Graph, model: nn.Module, x: torch.Tensor) -> bool:
    """The loaded graph (without dropout) and ``model`` in evaluation mode, with the runner's initial values."""
    params = initialise(graph, "default", seed=11)
    model = copy.deepcopy(model).eval()
    model.load_state_dict(params)
    with torch.no_grad():
        return torch.allclose(torch.func.functional_call(graph.eval_module, params, (x,)), model(x), atol=1e-5)


def test_code_in_node_and_tensor_names_is_never_run(program):
    model = mlp()
    program = kernel(model, torch.zeros(2, 30))
    doc = rename_all(json.loads(program), lambda old: f"{old}; {CODE} #")
    graph = runner(json.dumps(doc).encode())
    assert "environ" not in graph.module.code and "environ" not in graph.eval_module.code
    assert "environ" not in graph.built.decode()
    assert outputs_agree(graph, model, torch.randn(5, 30))


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("w=print(1)", "not a dotted name"),
        ("fc.__class__", "not a dotted name"),
        ("__init__", "not a dotted name"),
        ("fc.weight\nimport os", "not a dotted name"),
        ("class.weight", "holds a Python keyword"),
        ("forward", "cannot be built"),
        ("training", "cannot be built"),
    ],
)
def test_code_or_clashes_in_parameter_names_are_refused(program, name, why):
    def parameter_name(doc):
        doc["graph_module"]["signature"]["input_specs"][0]["parameter"]["parameter_name"] = name

    with pytest.raises(GraphRefused, match=why):
        runner(edited(program, parameter_name))


def test_sympy_never_sees_a_string_from_the_document(program, monkeypatch):
    import sympy

    seen: list[str] = []
    original = sympy.sympify

    def recording(text, *args, **kwargs):
        seen.append(str(text))
        return original(text, *args, **kwargs)

    monkeypatch.setattr(sympy, "sympify", recording)
    doc = json.loads(program)
    for meta in doc["graph_module"]["graph"]["tensor_values"].values():  # another symbol name, the same meaning
        for size in meta["sizes"] + meta["strides"]:
            if "as_expr" in size:
                size["as_expr"]["expr_str"] = size["as_expr"]["expr_str"].replace("'s", "'s7")
    doc["range_constraints"] = {f"s7{k[1:]}": v for k, v in doc["range_constraints"].items()}
    graph = runner(json.dumps(doc).encode())
    assert seen and all(
        re.fullmatch(r"(Mul\(Integer\(\d+\), )?Symbol\('s0', positive=True, integer=True\)\)?", s) for s in seen
    )
    assert graph.params

    places = {
        "a size": lambda d: d["graph_module"]["graph"]["tensor_values"]["input"]["sizes"][0]["as_expr"],
        "a stride": lambda d: d["graph_module"]["graph"]["tensor_values"]["linear"]["strides"][0].setdefault(
            "as_expr", {}
        ),
    }
    for where, at in places.items():
        for text in (SYMPY_CODE, "Symbol('s0', positive=True, integer=True) + " + SYMPY_CODE, "s0*2", "Symbol('s0')"):
            doc = json.loads(program)
            place = at(doc)
            place["expr_str"] = text
            if where == "a stride":
                doc["graph_module"]["graph"]["tensor_values"]["linear"]["strides"][0] = {"as_expr": place}
            seen.clear()
            with pytest.raises(GraphRefused, match="expressions other than the batch size"):
                runner(json.dumps(doc).encode())
            assert not seen


def test_another_schema_version_is_refused(program):
    from torch._export.serde.schema import SCHEMA_VERSION

    major, minor = SCHEMA_VERSION
    for version in (
        {"major": major + 1, "minor": 0},
        {"major": major - 1, "minor": minor},
        {"major": major, "minor": minor + 1},
    ):
        with pytest.raises(GraphRefused, match=rf"schema {version['major']}\.{version['minor']}, the runner reads"):
            runner(edited(program, lambda doc, v=version: doc.__setitem__("schema_version", v)))
    older = runner(edited(program, lambda doc: doc.__setitem__("schema_version", {"major": major, "minor": 0})))
    assert json.loads(older.built)["schema_version"] == {"major": major, "minor": minor}


@pytest.mark.parametrize(
    ("kind", "payload", "said"),
    [
        ("tensor_constant", {"arg": {"name": "c"}, "tensor_constant_name": "c"}, "holds a tensor constant"),
        ("constant_input", {"name": "c", "value": {"as_int": 1}}, "holds a constant input"),
        ("custom_obj", {"arg": {"name": "c", "class_fqn": "os.system"}, "custom_obj_name": "c"}, "holds a custom obj"),
        ("token", {"arg": {"name": "c"}}, "holds a token"),
        ("buffer", {"arg": {"name": "c"}, "buffer_name": "running_mean", "persistent": True}, "has a buffer"),
    ],
)
def test_constants_objects_and_buffers_added_to_a_document_are_refused(program, kind, payload, said):
    def add(doc):
        doc["graph_module"]["signature"]["input_specs"].insert(0, {kind: payload})
        doc["graph_module"]["graph"]["inputs"].insert(0, {"as_tensor": {"name": "c"}})

    with pytest.raises(GraphRefused, match=said):
        runner(edited(program, add))


def test_node_arguments_must_fit_the_operators_schema(program):
    doc = json.loads(program)
    linear = nodes(doc)[0]
    assert linear["target"] == "torch.ops.aten.linear.default"

    def with_arg(name, arg):
        d = copy.deepcopy(doc)
        for named in nodes(d)[0]["inputs"]:
            if named["name"] == name:
                named["arg"] = arg
        return json.dumps(d).encode()

    with pytest.raises(
        GraphRefused, match=r"argument 'weight' is 'as_int', which .*linear.default does not take there"
    ):
        runner(with_arg("weight", {"as_int": 3}))
    with pytest.raises(GraphRefused, match=r"argument 'bias' is 'as_string'.*does not take there"):
        runner(with_arg("bias", {"as_string": "tanh"}))
    with pytest.raises(GraphRefused, match="the string 'os.system'"):
        runner(with_arg("bias", {"as_string": "os.system"}))
    with pytest.raises(
        GraphRefused, match=r"argument 'input' is of kind 'as_scalar_type'.*tensors, numbers and sizes only"
    ):
        runner(with_arg("input", {"as_scalar_type": 7}))

    missing = copy.deepcopy(doc)
    nodes(missing)[0]["inputs"] = [a for a in nodes(missing)[0]["inputs"] if a["name"] != "weight"]
    with pytest.raises(GraphRefused, match="calls torch.ops.aten.linear.default without weight"):
        runner(json.dumps(missing).encode())

    # the document cannot decide what is positional: the loader orders the arguments by the schema
    shuffled = copy.deepcopy(doc)
    for node in nodes(shuffled):
        node["inputs"] = [{**a, "kind": 2} for a in reversed(node["inputs"])]
    graph = runner(json.dumps(shuffled).encode())
    assert [a["kind"] for a in json.loads(graph.built)["graph_module"]["graph"]["nodes"][0]["inputs"]] == [1, 1, 1]
    assert outputs_agree(graph, mlp(), torch.randn(4, 30))


def test_a_graph_whose_operators_do_not_fit_together_is_refused_at_load():
    program = kernel(nn.Sequential(nn.Linear(30, 16), nn.Dropout(0.2), nn.Linear(16, 2)), torch.zeros(2, 30))

    def set_p(value):
        def change(doc):
            for node in nodes(doc):
                if node["target"] == "torch.ops.aten.dropout.default":
                    for named in node["inputs"]:
                        if named["name"] == "p":
                            named["arg"] = {"as_float": value}

        return change

    with pytest.raises(GraphRefused, match="does not compute for a batch of 1 .*dropout probability"):
        runner(edited(program, set_p(1.5)))
    with pytest.raises(GraphRefused, match="holds the number nan; the runner's operators take finite ones"):
        runner(edited(program, set_p(float("nan"))))

    def wrong_width(doc):
        doc["graph_module"]["graph"]["tensor_values"]["p_2_weight"]["sizes"] = [{"as_int": 2}, {"as_int": 17}]

    with pytest.raises(GraphRefused, match="does not compute for a batch of 1"):
        runner(edited(program, wrong_width))


def test_deep_nesting_is_refused_or_dropped(program):
    deep: object = 1
    for _ in range(500):
        deep = [deep]
    with pytest.raises(GraphRefused, match="not an exported program's"):
        runner(edited(program, lambda doc: nodes(doc)[0]["inputs"][2].__setitem__("arg", {"as_ints": deep})))
    # in metadata the loader drops, nesting costs nothing
    graph = runner(edited(program, lambda doc: nodes(doc)[0].__setitem__("metadata", {"stack_trace": deep})))
    assert all(n["metadata"] == {} for n in json.loads(graph.built)["graph_module"]["graph"]["nodes"])
    for text in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000):
        with pytest.raises(GraphRefused, match="not JSON"):
            load_graph(text, max_bytes=len(text))


def test_recurrent_layers_are_refused_with_advice():
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(4, 8, batch_first=True)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            return self.out(self.gru(x)[0][:, -1])

    with pytest.raises(GraphRefused, match=r"'torch.ops.aten.gru.input' at node .*not in the runner's list"):
        runner(kernel(Recurrent(), torch.zeros(2, 5, 4)))


# -- fuzzing: mutated documents are refused, or compute what the loader's own document says ----------------

FUZZ_KINDS = ("mlp", "cnn", "sequence", "attention", "tanh")
_FUZZ_CACHE: dict[str, tuple[nn.Module, bytes]] = {}


def exported(kind: str) -> tuple[nn.Module, bytes]:
    """One model of ``kind`` and its exported program, made once per test run."""
    if kind not in _FUZZ_CACHE:
        make, rows, _ = MODELS[kind]
        torch.manual_seed(0)
        model = make()
        _FUZZ_CACHE[kind] = (model, kernel(model, rows(2)))
    return _FUZZ_CACHE[kind]


def interpret(built: bytes, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The loader's document evaluated node by node, straight from the schema's fields, dropout off: an
    oracle that shares nothing with torch's deserializer or the Python source it generates."""
    graph_module = json.loads(built)["graph_module"]
    env: dict[str, object] = {}
    for spec in graph_module["signature"]["input_specs"]:
        if "parameter" in spec:
            env[spec["parameter"]["arg"]["name"]] = params[spec["parameter"]["parameter_name"]]
        else:
            env[spec["user_input"]["arg"]["as_tensor"]["name"]] = x

    def value(arg):
        ((kind, payload),) = arg.items()
        if kind == "as_tensor":
            return env[payload["name"]]
        if kind == "as_tensors":
            return [env[t["name"]] for t in payload]
        if kind == "as_none":
            return None
        if kind == "as_sym_int":
            return env[payload["as_name"]] if "as_name" in payload else payload["as_int"]
        if kind == "as_sym_ints":
            return [env[v["as_name"]] if "as_name" in v else v["as_int"] for v in payload]
        return payload  # numbers, lists of numbers, strings

    for node in graph_module["graph"]["nodes"]:
        _, _, _, name, overload = node["target"].split(".")
        op = getattr(getattr(torch.ops.aten, name), overload)
        args = [value(a["arg"]) for a in node["inputs"] if a["kind"] == 1]
        kwargs = {a["name"]: value(a["arg"]) for a in node["inputs"] if a["kind"] == 2}
        ((out_kind, out),) = node["outputs"][0].items()
        if name == "dropout":
            result = args[0]
        else:
            result = op(*args, **kwargs)
        env[out["as_name"] if out_kind == "as_sym_int" else out["name"]] = result
    return env[graph_module["graph"]["outputs"][0]["as_tensor"]["name"]]  # type: ignore[return-value]


HOSTILE_TEXT = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        [
            CODE,
            SYMPY_CODE,
            "Symbol('s0', positive=True, integer=True)",
            "input",
            "self",
            "forward",
            "__class__",
            "torch.ops.aten.copy_.default",
            "torch.ops.higher_order.cond",
            "os.system",
            "tanh",
            "s0",
        ]
    ),
)
JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        HOSTILE_TEXT,
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(HOSTILE_TEXT, inner, max_size=4),
    max_leaves=8,
) | st.sampled_from(
    [
        {"as_int": 1},
        {"as_tensor": {"name": "linear"}},
        {"as_graph": {"name": "g", "graph": {}}},
        {"as_operator": "torch.load"},
        {"as_string": "tanh"},
        {"as_float": 0.5},
        {"as_ints": [1, -1]},
        {"as_expr": {"expr_str": SYMPY_CODE}},
    ]
)


def mutate_with(doc, data) -> None:
    """One change drawn by hypothesis somewhere in ``doc``: a value replaced (by a drawn one or by another
    part of the document), a key dropped, a list entry repeated or two swapped."""
    item, path = doc, []
    while isinstance(item, dict | list) and item and data.draw(st.integers(0, 7), label="deeper") != 0:
        keys = list(item) if isinstance(item, dict) else list(range(len(item)))
        key = data.draw(st.sampled_from(keys), label="key")
        path.append((item, key))
        item = item[key]
    if not path:
        return
    parent, key = path[-1]
    action = data.draw(st.sampled_from(["replace", "elsewhere", "drop", "repeat", "swap"]), label="action")
    if action == "drop" and isinstance(parent, dict):
        del parent[key]
    elif action == "repeat" and isinstance(parent, list):
        parent.append(copy.deepcopy(parent[key]))
    elif action == "swap" and isinstance(parent, list) and len(parent) > 1:
        other = data.draw(st.integers(0, len(parent) - 1), label="other")
        parent[key], parent[other] = parent[other], parent[key]
    elif action == "elsewhere":
        source, steps = doc, 0
        while isinstance(source, dict | list) and source and steps < 12 and data.draw(st.integers(0, 5)) != 0:
            keys = list(source) if isinstance(source, dict) else list(range(len(source)))
            source, steps = source[data.draw(st.sampled_from(keys))], steps + 1
        parent[key] = copy.deepcopy(source)
    else:
        parent[key] = copy.deepcopy(data.draw(JSON_VALUES, label="value"))  # drawn examples are shared


FUZZ = settings(
    max_examples=int(os.environ.get("PAITIENT_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)


@FUZZ
@given(kind=st.sampled_from(FUZZ_KINDS), data=st.data())
def test_mutated_documents_are_refused_or_compute_what_they_say(kind, data):
    model, program = exported(kind)
    _, rows, _ = MODELS[kind]
    doc = json.loads(program)
    for _ in range(data.draw(st.integers(1, 3), label="changes")):
        mutate_with(doc, data)
    try:
        graph = load_graph(json.dumps(doc).encode())
    except GraphRefused as e:
        assert str(e)  # the loader's own error, with a message; any other exception fails the test
        event("refused")
        return
    assert graph.ops <= ALLOWED_OPS
    params = initialise(graph, "default", seed=5)
    torch.manual_seed(1)
    x = rows(4)
    try:
        expected = interpret(graph.built, params, x)
    except (RuntimeError, IndexError) as e:  # values the mutated graph cannot take (an index past a table)
        with pytest.raises(type(e)):
            torch.func.functional_call(graph.eval_module, params, (x,))
        event("loaded; both fail on the data")
        return
    got = torch.func.functional_call(graph.eval_module, params, (x,))
    assert torch.allclose(got, expected, atol=1e-5, equal_nan=True)
    event("loaded; computes what its document says")
    if graph.built == load_graph(program).built:  # a change the loader's document does not keep
        event("loaded; the same document as the export's")
        model = copy.deepcopy(model).eval()
        model.load_state_dict(params)
        with torch.no_grad():
            assert torch.allclose(got, model(x), atol=1e-5)


@FUZZ
@given(kind=st.sampled_from(FUZZ_KINDS), names=st.lists(HOSTILE_TEXT, min_size=300, max_size=300), data=st.data())
def test_hostile_names_and_metadata_change_nothing(kind, names, data):
    model, program = exported(kind)
    _, rows, _ = MODELS[kind]
    doc = json.loads(program)
    old = sorted(
        set(doc["graph_module"]["graph"]["tensor_values"]) | set(doc["graph_module"]["graph"]["sym_int_values"])
    )
    fresh = {name: f"{i}{names[i % len(names)]}" for i, name in enumerate(old)}  # distinct, and each one hostile
    doc = rename_all(doc, fresh.__getitem__)
    junk = data.draw(JSON_VALUES, label="metadata")
    for node in nodes(doc):
        node["metadata"] = {"stack_trace": junk, "nn_module_stack": CODE, "torch_fn": junk}
    doc["graph_module"]["metadata"] = {CODE: junk}
    doc["graph_module"]["module_call_graph"].append({"fqn": CODE, "signature": junk})
    graph = load_graph(json.dumps(doc).encode())
    assert graph.built == load_graph(program).built
    assert outputs_agree(graph, model, rows(5))


class Steered(nn.Module):
    """A model whose graph pulls a parameter towards numbers the kernel chose (``pull``), beside a linear model."""

    def __init__(self, pull: list[float]):
        super().__init__()
        self.pull = pull
        self.lin = nn.Linear(30, 1)
        self.carrier = nn.Parameter(torch.zeros(len(pull)))

    def forward(self, x):
        d = self.carrier - torch.cat([self.carrier[i : i + 1] * 0 + v for i, v in enumerate(self.pull)])
        penalty = (d * d).sum()
        return self.lin(x) + penalty * 1000.0 + 50.0


def test_the_listing_shows_every_parameter_operation_and_number_a_steward_must_read():
    """The runner's listing of a graph names each parameter with its shape, each operation with every
    argument, and lists the numbers the operations compute with: the kernel's numbers in a graph steer what
    training writes into the weights, so they are what a steward reads before weights leave."""
    graph = runner(kernel(Steered([0.4172, 0.8391]), torch.zeros(2, 30)))
    lines = graph.listing
    assert lines[:3] == (
        "p0 = parameter carrier [2]",
        "p1 = parameter lin.weight [1, 30]",
        "p2 = parameter lin.bias [1]",
    )
    assert "x3 = input [batch, 30]" in lines and lines[-1].startswith("output t")
    assert any(re.fullmatch(r"t\d+ = add\.Tensor\(self=t\d+, other=0\.4172\)", line) for line in lines)
    assert "t5 = mul.Tensor(self=t4, other=0)" in lines  # an integer it computes with is a number too
    assert any(re.fullmatch(r"t\d+ = linear\.default\(input=x3, weight=p1, bias=p2\)", line) for line in lines)
    assert graph.numbers == (0.0, 1.0, 0.4172, 2.0, 0.8391, 1000.0, 50.0)  # a slice's bounds too
    plain = runner(kernel(mlp(), torch.zeros(2, 30)))
    assert plain.numbers == () and all(" = parameter " in line for line in plain.listing[:4])


class Bounded(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(30, 2)

    def forward(self, x):
        return nn.functional.hardtanh(self.lin(x), -1234567, 7654321)[:, 0:2]


class Counted(nn.Module):
    """A value made of sizes alone: a slice of a row of ones, summed, is its length."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(30, 1)
        self.src = nn.Parameter(torch.zeros(10000))
        self.carrier = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        ones = torch.softmax(self.src.view(10000, 1), dim=1).view(10000)
        d = self.carrier - ones[:4172].sum() / ones[:10000].sum()
        return self.lin(x) + (d * d).sum() * 1000.0


def test_every_number_in_an_argument_is_listed_integers_and_sizes_too():
    """An integer bound steers a parameter as a float does, and so does a slice's end (a slice of ones,
    summed, is its length): every number in an operation's argument is among those a steward reads, but a
    slice's "to the end". An integer sent as a size is written, and listed, as the integer it is."""
    graph = runner(kernel(Bounded(), torch.zeros(2, 30)))
    assert graph.numbers == (-1234567.0, 7654321.0, 0.0)
    counted = kernel(Counted(), torch.zeros(2, 30))
    assert {4172.0, 10000.0, 1000.0} <= set(runner(counted).numbers)
    doc = json.loads(counted)
    ends = 0
    for node in doc["graph_module"]["graph"]["nodes"]:
        for a in node["inputs"]:
            if a["name"] == "end" and "as_int" in a["arg"]:
                a["arg"] = {"as_sym_int": {"as_int": a["arg"]["as_int"]}}
                ends += 1
    assert ends == 2
    hidden = runner(json.dumps(doc).encode())
    assert {4172.0, 10000.0} <= set(hidden.numbers)
    assert sum("end=4172)" in line for line in hidden.listing) == 1 and not any(
        "end=batch" in line for line in hidden.listing
    )
    assert any(
        "hardtanh.default(self=t" in line and "min_val=-1234567, max_val=7654321)" in line for line in graph.listing
    )


class Sized(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(30, 1)
        self.src = nn.Parameter(torch.zeros(4172))

    def forward(self, x):
        return self.lin(x.view(x.shape[0], -1)) + self.src.sum()


@pytest.mark.parametrize("size", ["integer", "batch"])
def test_a_size_read_from_a_parameter_is_refused_as_the_listing_would_call_it_batch(size):
    """The listing calls every size read from a tensor ``batch``, and its numbers leave sizes out: a graph
    edited to read a parameter's length (4172) as a size, declared as that integer or as the batch symbol,
    would compute with a number the steward never sees. Only the batch size, read where a tensor holds it,
    is taken; the unedited graph, which reads the input's first dimension, loads."""
    program = kernel(Sized(), torch.zeros(2, 30))
    assert runner(program).numbers == (0.0, -1.0)  # the dimension read, and the view's "the rest"
    doc = json.loads(program)
    graph = doc["graph_module"]["graph"]
    first = graph["nodes"][0]
    assert first["target"] == "torch.ops.aten.sym_size.int"
    name = first["outputs"][0]["as_sym_int"]["as_name"]
    first["inputs"][0]["arg"] = {"as_tensor": {"name": "p_src"}}
    if size == "integer":
        graph["sym_int_values"][name] = {"as_int": 4172}
    with pytest.raises(GraphRefused, match="reads a size other than the batch size; the runner's graphs read only"):
        runner(json.dumps(doc).encode())


class Relabelled(nn.Module):
    """``carrier`` pulled towards the batch size over 10000, the batch read from the input and used as the
    end of a slice of ones."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.src = nn.Parameter(torch.zeros(2, 2086))
        self.carrier = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        n = x.shape[0]
        ones = (self.src * 0 + 1).view(-1)
        d = self.carrier - (x[:, 0] * 0 + 1)[:n].sum() / 10000.0
        return self.lin(x) + (d * d).sum() * 1000.0 + ones.sum() * 0


def test_a_size_read_from_a_tensor_the_document_declares_batch_sized_is_refused():
    """An intermediate tensor's declared sizes are the document's word: a graph edited so that its size
    node reads the 4172 ones of a parameter's shape, declared as ``[batch]``, and a slice ends there, would
    be listed as ``end=batch`` while training pulls ``carrier`` to 0.4172. Sizes are read from the input
    only; the unedited graph loads."""
    program = kernel(Relabelled(), torch.zeros(2, 3))
    runner(program)
    doc = json.loads(program)
    graph = doc["graph_module"]["graph"]
    nodes = graph["nodes"]

    def out(n):
        return n["outputs"][0].get("as_tensor", {}).get("name") or n["outputs"][0]["as_sym_int"]["as_name"]

    ones = next(out(n) for n in nodes if n["target"].endswith("view.default"))
    cut = next(n for n in nodes if n["target"].endswith("slice.Tensor") and "as_sym_int" in n["inputs"][3]["arg"])
    size = nodes.pop(0)
    assert size["target"] == "torch.ops.aten.sym_size.int"
    size["inputs"][0]["arg"] = {"as_tensor": {"name": ones}}
    nodes.insert(next(i for i, n in enumerate(nodes) if out(n) == ones) + 1, size)
    graph["tensor_values"][ones]["sizes"] = [graph["sym_int_values"][out(size)]]
    cut["inputs"][0]["arg"] = {"as_tensor": {"name": ones}}
    with pytest.raises(GraphRefused, match="reads a size other than the batch size; the runner's graphs read only"):
        runner(json.dumps(doc).encode())


class Gated(nn.Module):
    """Mixes rows only for a value no ordinary row holds: a mean over the batch of relu(x - 6)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(30, 2)

    def forward(self, x):
        return self.lin(x * 0.001 + torch.relu(x - 6.0).mean(0, keepdim=True) * 100.0)


class Mixing(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.lin = nn.Linear(30, 2)

    def forward(self, x):
        h = self.lin(x)
        if self.how == "gram":
            return h + (x @ x.t() @ x)[:, :2] * 0.01
        if self.how == "softmax over the batch":
            return torch.softmax(h, 0)
        if self.how == "first row":
            return h + x[0, :2]
        if self.how == "total":
            return h + x.sum() * 0.01
        if self.how == "transposed":
            return h.t().flatten().view(x.shape[0], 2)
        if self.how == "first rows":
            return h + h[:1]
        raise AssertionError(self.how)


@pytest.mark.parametrize("how", ["gram", "softmax over the batch", "first row", "total", "transposed", "first rows"])
def test_a_graph_that_reads_other_rows_is_never_clipped_the_fast_way(how):
    """The fast way of clipping takes each row's gradient norm from that row's activations: right only where
    no output row reads another row. Whether it does is read from the graph's operators and shapes, not from
    a probe of values."""
    try:
        program = kernel(Mixing(how), torch.zeros(2, 30))
    except ModelNotExportable:
        pytest.fail(f"{how}: the exporter refused the model")
    assert runner(program).rows_independent is False


def test_rows_are_found_independent_in_the_layers_models_are_made_of():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.lin = nn.Linear(4 * 26 * 26, 2)

        def forward(self, x):
            h = torch.relu(self.conv(x))
            return self.lin(h.view(h.shape[0], -1)).log_softmax(-1)

    assert runner(kernel(mlp(), torch.zeros(2, 30))).rows_independent
    assert runner(kernel(cnn(), torch.zeros(2, 1, 28, 28))).rows_independent
    assert runner(kernel(Flat(), torch.zeros(2, 1, 28, 28))).rows_independent
    normed_graph = runner(kernel(normed(), torch.zeros(2, 30)))
    assert normed_graph.rows_independent, normed_graph.listing


def test_a_mean_over_the_batch_that_no_probe_row_reaches_still_trains_the_exact_way():
    """A graph that mixes rows only when a row holds a value above 6 agrees with the exact way on every
    probe of ordinary rows, and one outlying row then moves the fast way's clipped sum by 74 times the
    bound. The graph is found to mix rows from its structure, and the runner clips it the exact way: one
    row moves the clipped sum by at most the bound."""
    from paitient.services.jobs.persample import FastClipper, exact_clipped_sum, fast_path_agrees
    from paitient.services.jobs.train import sample_losses

    graph = runner(kernel(Gated(), torch.zeros(2, 30)))
    assert graph.rows_independent is False

    def forward(p, xb):
        return torch.func.functional_call(graph.module, p, (xb,))

    params = initialise(graph, "default", seed=1)
    torch.manual_seed(0)
    x = torch.randn(64, 30).clamp(-3, 3)
    x[0, 7] = 20.0
    y = torch.ones(64, dtype=torch.long)
    clipper = FastClipper(forward, sample_losses("cross_entropy"))
    assert fast_path_agrees(clipper, params, x, y, seed=0, loss="cross_entropy")  # the probe alone is fooled

    def fast(xb, yb):
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        total = clipper.clipped_sum(leaves, xb, yb, 1.0)[0]
        return torch.cat([total[k].flatten() for k in sorted(total)])

    def exact(xb, yb):
        total = exact_clipped_sum(forward, sample_losses("cross_entropy"), params, xb, yb, 1.0)[0]
        return torch.cat([total[k].flatten() for k in sorted(total)])

    assert (fast(x, y) - fast(x[1:], y[1:])).norm() > 10  # what the fast way would have let one row do
    assert (exact(x, y) - exact(x[1:], y[1:])).norm() <= 1.0 + 1e-5


class Alternating(nn.Module):
    """Each row's output is the sum of the first ``batch`` of 40 columns +h, -h, +h, ...: h for an odd
    batch, 0 for an even one."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin(x).unsqueeze(2)
        cols = torch.cat([h if j % 2 == 0 else -h for j in range(40)], dim=2)
        if self.how == "slice":
            return cols[:, :, : x.shape[0]].sum(2)
        return cols.select(2, x.shape[0])


@pytest.mark.parametrize("how", ["slice", "select"])
def test_a_graph_that_reads_the_batch_size_as_an_index_is_clipped_the_exact_way(how):
    """The batch size used as a bound or an index (``h[:, :, :x.shape[0]]``) makes each row's output depend
    on how many rows are in the batch. Exported by hand (the kernel's exporter refuses it), the graph loads,
    and the fast way, which agrees at a batch of 1 and at the probe's, let one row move the clipped sum by 6.7
    times the bound. Such a graph counts as mixing rows."""
    from torch._export.serde import serialize as serde

    exported = torch.export.export(
        Alternating(how).train(),
        (torch.zeros(3, 4),),
        dynamic_shapes=({0: torch.export.Dim("batch", min=2, max=39)},),
        strict=False,
    )
    graph = runner(bytes(serde.serialize(exported).exported_program))
    assert graph.rows_independent is False


def test_graphs_loaded_from_many_threads_at_once_all_load():
    """torch's deserialiser keeps the graph it is reading in module state and refuses a second meanwhile
    ("_CURRENT_DESERIALIZER is already set"); the runner loads graphs from its socket's threads and its workers'
    at once, and a collision refused a good graph at submit, or failed a job after its budget was reserved
    (charged in full). Every graph loads, however many threads load them together."""
    import threading

    programs = [kernel(mlp(), torch.zeros(2, 30)), kernel(normed(), torch.zeros(2, 30))]
    threads, rounds = 8, 6
    start = threading.Barrier(threads)
    errors: list[str] = []
    loaded: list[str] = []

    def load(i: int) -> None:
        start.wait()
        for r in range(rounds):
            try:
                loaded.append(load_graph(programs[(i + r) % len(programs)]).sha256)
            except Exception as e:  # noqa: BLE001 - what a collision raises is the point
                errors.append(f"{type(e).__name__}: {e}")

    workers = [threading.Thread(target=load, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(120)
    assert errors == []
    assert len(loaded) == threads * rounds


def test_the_deserialisers_shared_state_is_only_touched_under_the_lock(monkeypatch):
    """Every way into torch's deserialiser is under :data:`graph.BUILDING`: the lock is held whenever it runs."""
    from torch._export.serde import serialize as ser

    held: list[bool] = []
    deserialize = ser.ExportedProgramDeserializer.deserialize

    def watched(self, *args, **kwargs):
        held.append(graph_mod.BUILDING.locked())
        return deserialize(self, *args, **kwargs)

    monkeypatch.setattr(ser.ExportedProgramDeserializer, "deserialize", watched)
    load_graph(kernel(mlp(), torch.zeros(2, 30)))
    assert held == [True]
