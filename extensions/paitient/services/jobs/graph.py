"""A researcher's model as data: the exported graph, checked, loaded without running or unpickling anything.

The kernel sends the JSON of a ``torch.export`` program (:mod:`paitient.kernel.jobs.export`) and nothing
else: no parameter values, no constants, no pickles. Before anything is built from it, :func:`load_graph`
checks the JSON as untrusted input:

- its size, its top-level shape, the schema and opset it was written with;
- every node calls an operator of :data:`ALLOWED_OPS` (plain tensor math of MLPs, CNNs and small
  sequence models): no custom operator, no higher-order operator (no Python callback), no in-place op,
  no operator that reaches outside its tensors;
- the signature: parameters and exactly one input, whose first dimension (the batch) is dynamic; no
  buffers (BatchNorm's running statistics are state the runner will not carry), no constants, no custom
  objects, no mutation outputs; float32 parameters, at most :data:`MAX_PARAMETERS` values in all;
- the symbolic sizes are plain symbols (``Symbol('s7', positive=True, integer=True)``): the loader turns
  such strings into expressions, which must never see anything else;
- the metadata the exporter adds (stack traces, module paths, call graph of submodules) is dropped, and the
  input and output structures must be the plain one-tensor-in, one-tensor-out ones.

Then the program is built with a state dict the runner makes itself (zeros of the declared shapes);
:func:`initialise` gives the runner's own initial values, from a seed it draws.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

MAX_PARAMETERS = 50_000_000
MAX_NODES = 5_000
MAX_TENSORS = 20_000

ALLOWED_OPS: frozenset[str] = frozenset(
    f"torch.ops.aten.{op}"
    for op in (
        # layers
        "linear.default",
        "conv1d.default",
        "conv2d.default",
        "embedding.default",
        "layer_norm.default",
        "group_norm.default",
        "dropout.default",
        "max_pool1d.default",
        "max_pool2d.default",
        "avg_pool1d.default",
        "avg_pool2d.default",
        "adaptive_avg_pool1d.default",
        "adaptive_avg_pool2d.default",
        # activations
        "relu.default",
        "gelu.default",
        "silu.default",
        "sigmoid.default",
        "tanh.default",
        "elu.default",
        "leaky_relu.default",
        "hardtanh.default",
        "softmax.int",
        "log_softmax.int",
        # shapes
        "flatten.using_ints",
        "view.default",
        "reshape.default",
        "permute.default",
        "transpose.int",
        "t.default",
        "unsqueeze.default",
        "squeeze.dim",
        "cat.default",
        "sym_size.int",
        # arithmetic
        "add.Tensor",
        "sub.Tensor",
        "mul.Tensor",
        "div.Tensor",
        "neg.default",
        "matmul.default",
        "mm.default",
        "addmm.default",
        "mean.dim",
        "sum.dim_IntList",
    )
)
"""The operators a graph may call (as the exporter names them)."""

_SYMBOL = re.compile(r"Symbol\('s\d{1,7}', positive=True, integer=True\)")
_TOP = {
    "graph_module",
    "opset_version",
    "range_constraints",
    "schema_version",
    "verifiers",
    "torch_version",
    "guards_code",
}
_GRAPH = {
    "inputs",
    "outputs",
    "nodes",
    "tensor_values",
    "sym_int_values",
    "sym_bool_values",
    "is_single_tensor_return",
    "custom_obj_values",
    "sym_float_values",
}
_ONE_TENSOR_IN = (
    '[1, {"type": "builtins.tuple", "context": "null", "children_spec": [{"type": "builtins.tuple", "context": '
    '"null", "children_spec": [{"type": null, "context": null, "children_spec": []}]}, {"type": "builtins.dict", '
    '"context": "[]", "children_spec": []}]}]'
)
_ONE_TENSOR_OUT = '[1, {"type": null, "context": null, "children_spec": []}]'
_FLOAT32 = 7  # the schema's ScalarType.FLOAT


class GraphRefused(ValueError):
    """The graph cannot be trained by the runner; the message names what and says what to change."""


@dataclass(frozen=True)
class Graph:
    module: torch.nn.Module
    params: dict[str, tuple[tuple[int, ...], torch.dtype]]
    """Parameter name -> (shape, dtype), in the graph's order."""
    input_shape: tuple[int, ...]
    """One input row's shape (without the batch dimension)."""
    sha256: str
    ops: frozenset[str]
    consumers: dict[str, str]
    """Parameter name -> the operator that reads it (how :func:`initialise` knows a weight from a bias)."""


def load_graph(program: bytes, *, max_bytes: int = 2_000_000) -> Graph:
    """Check ``program`` (an exported program's JSON) and build it; raises :class:`GraphRefused`."""
    if len(program) > max_bytes:
        raise GraphRefused(f"the graph has {len(program)} bytes, more than {max_bytes}; use a smaller model")
    try:
        doc = json.loads(program)
    except (ValueError, UnicodeDecodeError):
        raise GraphRefused("the graph is not JSON: send what paitient.jobs.submit exports") from None
    params, input_name, consumers, ops = _check(doc)
    _check_symbols(doc)
    canonical = _canonical(doc)
    from torch._export.serde import serialize as ser
    from torch._export.serde.schema import ExportedProgram as Schema

    try:
        schema = ser._bytes_to_dataclass(Schema, json.dumps(canonical).encode())
        state: dict[str, torch.Tensor] = {
            name: torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for name, (shape, dtype) in params.items()
        }
        program_ = ser.ExportedProgramDeserializer().deserialize(schema, state, {}, None)
        module = program_.module()
    except GraphRefused:
        raise
    except Exception as e:
        raise GraphRefused(f"the graph cannot be built: {type(e).__name__}: {str(e)[:300]}") from None
    sizes = doc["graph_module"]["graph"]["tensor_values"][input_name]["sizes"]
    input_shape = tuple(int(s["as_int"]) for s in sizes[1:])
    return Graph(
        module=module,
        params=params,
        input_shape=input_shape,
        sha256=hashlib.sha256(program).hexdigest(),
        ops=frozenset(ops),
        consumers=consumers,
    )


def _refuse(message: str) -> GraphRefused:
    return GraphRefused(message)


def _check(doc: Any) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], str, dict[str, str], set[str]]:
    if not isinstance(doc, dict) or set(doc) != _TOP:
        raise _refuse("the graph's JSON is not an exported program's")
    if doc["guards_code"] not in ([], None) or doc["opset_version"] != {"aten": doc["opset_version"].get("aten")}:
        raise _refuse("the graph carries guard code or operator sets other than aten's")
    from torch._export.serde.schema import SCHEMA_VERSION

    if not isinstance(doc["schema_version"], dict) or doc["schema_version"].get("major") != SCHEMA_VERSION[0]:
        raise _refuse(
            f"the graph was exported with another torch.export schema; export it with torch {torch.__version__}"
        )
    gm = doc["graph_module"]
    if not isinstance(gm, dict) or not isinstance(gm.get("graph"), dict) or set(gm["graph"]) != _GRAPH:
        raise _refuse("the graph's JSON is not an exported program's")
    graph = gm["graph"]
    if graph["custom_obj_values"] or gm.get("treespec_namedtuple_fields"):
        raise _refuse("the graph holds custom objects; use plain tensors")
    specs = (gm.get("signature") or {}).get("input_specs") or []
    if any(isinstance(spec, dict) and "buffer" in spec for spec in specs):
        raise _refuse(
            "the model has buffers (BatchNorm's running statistics, say), state the runner does not carry: "
            "use LayerNorm or GroupNorm instead"
        )
    nodes = graph["nodes"]
    if not isinstance(nodes, list) or len(nodes) > MAX_NODES:
        raise _refuse(f"the graph has more than {MAX_NODES} operations")
    if not isinstance(graph["tensor_values"], dict) or len(graph["tensor_values"]) > MAX_TENSORS:
        raise _refuse("the graph has too many tensors")
    ops: set[str] = set()
    consumers: dict[str, str] = {}
    for node in nodes:
        target = node.get("target") if isinstance(node, dict) else None
        if target not in ALLOWED_OPS:
            raise _refuse(
                f"operation {str(target)[:120]!r} is not one the runner trains: use standard layers (Linear, Conv, "
                "pooling, normalisation without running statistics, activations)"
            )
        ops.add(target)
        for arg in node.get("inputs", []):
            name = (arg.get("arg") or {}).get("as_tensor", {}).get("name") if isinstance(arg, dict) else None
            if isinstance(name, str):
                consumers.setdefault(name, f"{target}:{arg.get('name')}")
    signature = gm["signature"]
    if not isinstance(signature, dict):
        raise _refuse("the graph has no signature")
    params: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    by_param: dict[str, str] = {}
    inputs: list[str] = []
    for spec in signature.get("input_specs", []):
        kind = next(iter(spec), None) if isinstance(spec, dict) and len(spec) == 1 else None
        if kind == "parameter":
            arg, name = spec[kind]["arg"]["name"], spec[kind]["parameter_name"]
            params[name] = _param_meta(graph["tensor_values"].get(arg), name)
            by_param[name] = consumers.get(arg, "")
        elif kind == "user_input":
            inputs.append(spec[kind]["arg"]["as_tensor"]["name"])
        else:
            raise _refuse(f"the graph's input {str(kind)[:40]!r} is not a parameter or the one input")
    outputs = signature.get("output_specs", [])
    if not outputs or any(not isinstance(s, dict) or set(s) != {"user_output"} for s in outputs):
        raise _refuse("the graph changes its inputs or buffers in place; the runner trains models that only compute")
    if len(inputs) != 1:
        raise _refuse(f"the model takes {len(inputs)} inputs; the runner gives it one tensor of rows")
    total = sum(math.prod(shape) for shape, _ in params.values())
    if total > MAX_PARAMETERS:
        raise _refuse(f"the model has {total:,} parameters, more than the runner trains ({MAX_PARAMETERS:,})")
    meta = graph["tensor_values"].get(inputs[0]) or {}
    sizes = meta.get("sizes") or []
    if not sizes or "as_expr" not in sizes[0] or any("as_int" not in s for s in sizes[1:]):
        raise _refuse("the input's first dimension must be the batch, exported as dynamic, and the others fixed")
    return params, inputs[0], by_param, ops


def _param_meta(meta: Any, name: str) -> tuple[tuple[int, ...], torch.dtype]:
    if not isinstance(meta, dict) or meta.get("dtype") != _FLOAT32:
        raise _refuse(f"parameter {name[:80]!r} is not float32")
    sizes = meta.get("sizes")
    if not isinstance(sizes, list) or not all(isinstance(s, dict) and isinstance(s.get("as_int"), int) for s in sizes):
        raise _refuse(f"parameter {name[:80]!r} has no fixed shape")
    shape = tuple(int(s["as_int"]) for s in sizes)
    if any(d <= 0 or d > MAX_PARAMETERS for d in shape):
        raise _refuse(f"parameter {name[:80]!r} has shape {shape}")
    return shape, torch.float32


def _check_symbols(doc: Any) -> None:
    """Every symbolic size is a plain positive integer symbol, and so is every range constraint's name."""
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            expr = item.get("expr_str")
            if expr is not None and not (isinstance(expr, str) and _SYMBOL.fullmatch(expr)):
                raise _refuse("the graph's sizes hold expressions other than the batch size; export with one Dim")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    ranges = doc["range_constraints"]
    if not isinstance(ranges, dict) or not all(re.fullmatch(r"s\d{1,7}", k) for k in ranges):
        raise _refuse("the graph's size ranges are not the batch size's")


def _canonical(doc: dict[str, Any]) -> dict[str, Any]:
    """The document without what the runner does not need and the loader would interpret: node metadata,
    the submodules' call graph (only the whole model's stays, with the plain one-tensor structures)."""
    gm = doc["graph_module"]
    calls = gm.get("module_call_graph")
    root = calls[0] if isinstance(calls, list) and calls and isinstance(calls[0], dict) else None
    sig = (root or {}).get("signature") or {}
    if (root or {}).get("fqn") != "" or sig.get("in_spec") != _ONE_TENSOR_IN or sig.get("out_spec") != _ONE_TENSOR_OUT:
        raise _refuse("the model must take one tensor and return one tensor")
    nodes = [{**n, "metadata": {}} for n in gm["graph"]["nodes"]]
    root_entry = {
        "fqn": "",
        "signature": {
            "inputs": [],
            "outputs": [],
            "in_spec": _ONE_TENSOR_IN,
            "out_spec": _ONE_TENSOR_OUT,
            "forward_arg_names": ["input"],
        },
    }
    return {
        **doc,
        "graph_module": {
            **gm,
            "graph": {**gm["graph"], "nodes": nodes},
            "module_call_graph": [root_entry],
            "metadata": {},
            "treespec_namedtuple_fields": {},
        },
    }


def initialise(graph: Graph, scheme: str, seed: int) -> dict[str, torch.Tensor]:
    """The runner's initial parameter values. ``default``: what PyTorch gives each layer kind (weights of
    linear and convolution layers Kaiming-uniform with a = sqrt(5), their biases uniform in +-1/sqrt(fan_in),
    normalisation weights 1 and biases 0, embeddings N(0, 1)); ``zeros``: all 0."""
    if scheme not in ("default", "zeros"):
        raise GraphRefused(f"initialisation scheme {scheme!r} is not default or zeros")
    gen = torch.Generator().manual_seed(int(seed))
    out: dict[str, torch.Tensor] = {}
    fan_in_of: dict[str, int] = {}
    for name, (shape, dtype) in graph.params.items():
        t = torch.zeros(shape, dtype=dtype)
        if scheme == "default":
            role = graph.consumers.get(name, "")
            op, _, arg = role.partition(":")
            if "norm" in op:
                if arg == "weight":
                    t.fill_(1.0)
            elif "embedding" in op:
                t.normal_(0.0, 1.0, generator=gen)
            elif arg == "weight" and len(shape) >= 2:
                fan_in = math.prod(shape[1:])
                fan_in_of[name.rsplit(".", 1)[0]] = fan_in
                bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform with a = sqrt(5): sqrt(6 / ((1 + 5) fan_in))
                t.uniform_(-bound, bound, generator=gen)
            elif arg == "bias":
                fan_in = fan_in_of.get(name.rsplit(".", 1)[0], shape[0])
                bound = 1.0 / math.sqrt(fan_in)
                t.uniform_(-bound, bound, generator=gen)
        out[name] = t
    return out
