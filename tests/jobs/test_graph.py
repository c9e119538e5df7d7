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
import struct

import pytest
import torch
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


MODELS = {
    "mlp": (mlp, lambda n: torch.randn(n, 30), 2),
    "cnn": (cnn, lambda n: torch.randn(n, 1, 28, 28), 10),
    "layer_norm": (normed, lambda n: torch.randn(n, 30), 2),
    "sequence": (Sequence, lambda n: torch.randint(0, 50, (n, 12)), 3),
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
