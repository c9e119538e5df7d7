"""A researcher's model as data: the exported graph, checked, loaded without running or unpickling anything.

The kernel sends the JSON of a ``torch.export`` program (:mod:`paitient.kernel.jobs.export`) and nothing
else: no parameter values, no constants, no pickles. :func:`load_graph` treats that JSON as untrusted input
and never hands it to torch as it came. It reads the document field by field and writes a new one of its
own, in which every name, expression and argument is one the loader chose or checked:

- the size first, then the top-level shape, the schema and opset it was written with;
- every node calls an operator of :data:`ALLOWED_OPS` (plain tensor math of MLPs, CNNs and small sequence
  models) with arguments the operator's schema names, of plain kinds (tensors, numbers, lists of them, a
  few words such as GELU's ``"tanh"``): no custom operator, no higher-order operator or nested graph (no
  Python callback), no operator passed as a value, no in-place op, no op that reaches outside its tensors;
  each node returns one value and reads only values made before it;
- the signature: parameters and exactly one input, whose first dimension (the batch) is dynamic; no
  buffers (BatchNorm's running statistics are state the runner will not carry), no constants, custom
  objects or effect tokens, no mutation outputs, one output; float32 parameters, at most
  :data:`MAX_PARAMETERS` values in all;
- names: the graph's tensors and sizes are renamed ``p0, x, t0, n0, ...`` by the loader (torch writes
  names into the Python source of the module it generates, so a name is code); parameter names, which the
  trained weights keep, must be dotted words;
- sizes: the loader parses symbolic sizes into expressions with ``sympy`` (which evaluates strings), so
  every one must be the batch symbol or an integer times it, and is rewritten in the loader's own spelling;
- the exporter's metadata (stack traces, module paths, the submodules' call graph) is dropped, and the
  input and output structures must be the plain one-tensor-in, one-tensor-out ones.

Only then is the program built, from the loader's document and a state dict of zeros the loader made.
:func:`initialise` gives the runner's own initial values, from a seed it draws.
"""

from __future__ import annotations

import copy
import hashlib
import json
import keyword
import math
import re
import threading
from dataclasses import dataclass
from typing import Any

import torch

MAX_PARAMETERS = 50_000_000
MAX_NODES = 5_000
MAX_TENSORS = 20_000
MAX_ROW = 10_000_000
"""Values in one input row (the input's size without the batch)."""

ALLOWED_OPS: frozenset[str] = frozenset(
    f"torch.ops.aten.{op}"
    for op in (
        # layers
        "linear.default",
        "conv1d.default",
        "conv1d.padding",
        "conv2d.default",
        "conv2d.padding",
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
        "squeeze.default",
        "squeeze.dim",
        "squeeze.dims",
        "cat.default",
        "contiguous.default",
        "select.int",
        "slice.Tensor",
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
        "mean.default",
        "mean.dim",
        "sum.default",
        "sum.dim_IntList",
    )
)
"""The operators a graph may call (as the exporter names them). Dropout is the one random operator: the
runner trains, so the kernel exports the model in training mode and dropout appears as
``aten.dropout.default(x, p, train=True)``; :attr:`Graph.eval_module` is the same graph without it."""

_SYM_SIZE = "torch.ops.aten.sym_size.int"
_WORDS = {"approximate": frozenset({"none", "tanh"}), "padding": frozenset({"same", "valid"})}
"""The strings an argument may hold, by argument name: GELU's approximation, a convolution's padding."""
_KINDS: dict[str, frozenset[str]] = {
    "Tensor": frozenset({"as_tensor"}),
    "Optional[Tensor]": frozenset({"as_tensor", "as_none"}),
    "List[Tensor]": frozenset({"as_tensors"}),
    "int": frozenset({"as_int", "as_sym_int"}),
    "Optional[int]": frozenset({"as_int", "as_sym_int", "as_none"}),
    "List[int]": frozenset({"as_ints", "as_sym_ints"}),
    "Optional[List[int]]": frozenset({"as_ints", "as_sym_ints", "as_none"}),
    "bool": frozenset({"as_bool"}),
    "float": frozenset({"as_float"}),
    "number": frozenset({"as_int", "as_float"}),
    "str": frozenset({"as_string"}),
}
"""The argument kinds the document may give for each type in an allowed operator's schema (``SymInt`` prints
as ``int``); a type not here takes none (a dtype or memory format as an argument is refused)."""
_TOP = frozenset(
    {
        "graph_module",
        "opset_version",
        "range_constraints",
        "schema_version",
        "verifiers",
        "torch_version",
        "guards_code",
    }
)
_GRAPH_MODULE = frozenset({"graph", "signature", "module_call_graph", "metadata", "treespec_namedtuple_fields"})
_GRAPH = frozenset(
    {
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
)
_NODE = frozenset({"target", "inputs", "outputs", "metadata", "is_hop_single_tensor_return", "name"})
_TENSOR_META = frozenset({"dtype", "sizes", "requires_grad", "device", "strides", "storage_offset", "layout"})
_ONE_TENSOR_IN = (
    '[1, {"type": "builtins.tuple", "context": "null", "children_spec": [{"type": "builtins.tuple", "context": '
    '"null", "children_spec": [{"type": null, "context": null, "children_spec": []}]}, {"type": "builtins.dict", '
    '"context": "[]", "children_spec": []}]}]'
)
_ONE_TENSOR_OUT = '[1, {"type": null, "context": null, "children_spec": []}]'
_BATCH = "Symbol('s0', positive=True, integer=True)"
_SYMBOL = re.compile(r"Symbol\('s\d{1,9}', positive=True, integer=True\)")
_SCALED = re.compile(r"Mul\(Integer\((\d{1,9})\), (Symbol\('s\d{1,9}', positive=True, integer=True\))\)")
_PARAMETER_NAME = re.compile(r"(?!__)\w{1,64}(\.(?!__)\w{1,64}){0,15}", re.ASCII)
_FLOAT, _LONG, _INT = 7, 5, 4  # the schema's ScalarType
_STRIDED = 7  # the schema's Layout.Strided
_INPUT_DTYPES = {_FLOAT: torch.float32, _LONG: torch.int64, _INT: torch.int32}
"""The dtypes the input may have (float32 rows, or integer ones: token ids for an embedding), and any tensor."""
_FORWARD_ARG = "rows"


class GraphRefused(ValueError):
    """The graph cannot be trained by the runner; the message names what and says what to change."""


@dataclass(frozen=True)
class Init:
    """How :func:`initialise` fills one parameter under the ``default`` scheme."""

    rule: str
    """``uniform`` (in +-``bound``), ``normal`` (N(0, 1)), ``ones`` or ``zeros``."""
    bound: float = 0.0
    zero_row: int | None = None
    """An embedding's padding row, kept at 0 as PyTorch does."""
    because: str = ""
    """The operator and argument that read the parameter, e.g. ``linear.default:weight``."""


@dataclass(frozen=True)
class Graph:
    module: torch.nn.Module
    """The program's module (``ExportedProgram.module()``), holding zeros: call it with
    ``torch.func.functional_call(module, params, (x,))``. Dropout is on (the runner trains)."""
    eval_module: torch.nn.Module
    """The same graph with every dropout node removed, for evaluation."""
    params: dict[str, tuple[tuple[int, ...], torch.dtype]]
    """Parameter name -> (shape, dtype), in the graph's order."""
    input_shape: tuple[int, ...]
    """One input row's shape (without the batch dimension)."""
    input_dtype: torch.dtype
    sha256: str
    """Of the program's bytes as received."""
    ops: frozenset[str]
    inits: dict[str, Init]
    """Parameter name -> its ``default`` initialisation, decided from the operator that reads it."""
    built: bytes
    """The JSON of the document the loader wrote and built the module from (every name, size and
    argument in it chosen or checked by the loader)."""
    rows_independent: bool = False
    """Each output row is computed from its own input row alone (:func:`rows_independent`): only then may
    the trainer clip the fast way."""

    @property
    def listing(self) -> tuple[str, ...]:
        """The graph as a steward reads it (:func:`listing`)."""
        return listing(json.loads(self.built))

    @property
    def numbers(self) -> tuple[float, ...]:
        """Every number the graph computes with (:func:`numbers`)."""
        return numbers(json.loads(self.built))


def _shown(arg: dict[str, Any]) -> str:
    """One argument of the loader's document, as a line of the listing shows it."""
    (kind, value), *_ = arg.items()
    if kind == "as_tensor":
        return str(value["name"])
    if kind == "as_tensors":
        return "[" + ", ".join(str(t["name"]) for t in value) + "]"
    if kind == "as_sym_int":
        return "batch" if "as_name" in value else str(value.get("as_int"))
    if kind == "as_sym_ints":
        return "[" + ", ".join("batch" if "as_name" in v else str(v.get("as_int")) for v in value) + "]"
    if kind == "as_none":
        return "None"
    if kind == "as_float":
        return repr(float(value))
    return json.dumps(value)


def _dim(size: dict[str, Any]) -> str:
    return str(size["as_int"]) if "as_int" in size else "batch"


def listing(document: dict[str, Any]) -> tuple[str, ...]:
    """A document the loader wrote (:attr:`Graph.built`), one line per input, parameter, operation and output,
    every argument shown with its value: what the runner trains, as a steward reads it on a request's page.
    A graph's numbers and its structure steer what training writes into the weights (a node that pulls a
    parameter towards a number the kernel chose leaves that number in the released weights), so a steward
    reads them before weights leave."""
    gm = document["graph_module"]
    tensors = gm["graph"]["tensor_values"]
    lines = []
    for spec in gm["signature"]["input_specs"]:
        if "parameter" in spec:
            name = spec["parameter"]["arg"]["name"]
            shape = ", ".join(_dim(d) for d in tensors[name]["sizes"])
            lines.append(f"{name} = parameter {spec['parameter']['parameter_name']} [{shape}]")
        else:
            name = spec["user_input"]["arg"]["as_tensor"]["name"]
            shape = ", ".join(_dim(d) for d in tensors[name]["sizes"])
            lines.append(f"{name} = input [{shape}]")
    for node in gm["graph"]["nodes"]:
        op = str(node["target"]).removeprefix("torch.ops.aten.")
        args = ", ".join(f"{a['name']}={_shown(a['arg'])}" for a in node["inputs"])
        outs = ", ".join(_shown(o) for o in node["outputs"])
        lines.append(f"{outs} = {op}({args})")
    lines.append("output " + ", ".join(_shown(o["user_output"]["arg"]) for o in gm["signature"]["output_specs"]))
    return tuple(lines)


_TO_THE_END = 2**63 - 1
"""A slice's end when it runs to the end of its dimension (``x[:, 1:]``), as the exporter writes it."""


def numbers(document: dict[str, Any]) -> tuple[float, ...]:
    """The distinct numbers in a document's operations' arguments, in order of first use: every float and
    every integer, whatever the argument (a scale, a bound, a slice's end, a size, a dimension), since any of
    them can become a value the graph computes with (a slice of a row of ones, summed, is its length). Not a
    complete account: a parameter's shape can become one too (the sum of ones the size of a parameter)."""
    seen: dict[float, None] = {}

    def one(v: float) -> None:
        if v != _TO_THE_END:
            seen.setdefault(float(v), None)

    def add(arg: dict[str, Any]) -> None:
        (kind, value), *_ = arg.items()
        if kind in ("as_int", "as_float"):
            one(value)
        elif kind in ("as_ints", "as_floats"):
            for v in value:
                one(v)
        elif kind == "as_sym_int" and "as_int" in value:
            one(value["as_int"])
        elif kind == "as_sym_ints":
            for v in value:
                if "as_int" in v:
                    one(v["as_int"])

    for node in document["graph_module"]["graph"]["nodes"]:
        for a in node["inputs"]:
            add(a["arg"])
    return tuple(seen)


def row_output_shape(graph: Graph) -> tuple[int, ...]:
    """The shape of one row's output (without the batch dimension), from a run on the ``meta`` device: shapes
    only, no values."""
    params = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in graph.params.items()}
    x = torch.empty((1, *graph.input_shape), dtype=graph.input_dtype, device="meta")
    out = torch.func.functional_call(graph.eval_module, params, (x,))
    return tuple(int(d) for d in out.shape[1:])


def load_graph(program: bytes, *, max_bytes: int = 2_000_000) -> Graph:
    """Check ``program`` (an exported program's JSON), rebuild it and build the module from the rebuilt
    document; raises :class:`GraphRefused`, naming what is refused and what to change."""
    reading = _read(program, max_bytes)  # (pure: any number of threads at once)
    with BUILDING:
        module = _build(reading)
        try:
            eval_module = _without_dropout(module)
        except Exception as e:  # torch's graph checks
            raise GraphRefused(f"the graph cannot be built: {type(e).__name__}: {str(e)[:300]}") from None
        _check_runs(module, eval_module, reading)
        independent = rows_independent(module, reading.input_shape, reading.input_dtype)
    return Graph(
        module=module,
        eval_module=eval_module,
        params=reading.params,
        input_shape=reading.input_shape,
        input_dtype=reading.input_dtype,
        sha256=hashlib.sha256(program).hexdigest(),
        ops=frozenset(reading.ops),
        inits=reading.inits,
        built=json.dumps(reading.document).encode(),
        rows_independent=independent,
    )


def described(program: bytes, *, max_bytes: int = 2_000_000) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The :func:`listing` and :func:`numbers` of a program already taken by :func:`load_graph`, from the
    loader's document alone: nothing is built or run."""
    document = _read(program, max_bytes).document
    return listing(document), numbers(document)


def _read(program: bytes, max_bytes: int) -> _Reading:
    """The loader's reading of ``program``: every part checked, the document rewritten."""
    if len(program) > max_bytes:
        raise GraphRefused(f"the graph has {len(program)} bytes, more than {max_bytes}; use a smaller model")
    try:
        doc = json.loads(program)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise GraphRefused("the graph is not JSON: send what paitient.jobs.export_graph exports") from None
    try:
        reading = _Reader().read(doc)
    except GraphRefused:
        raise
    except (TypeError, KeyError, AttributeError, IndexError, ValueError, RecursionError) as e:  # a shape unforeseen
        raise GraphRefused(f"the graph's JSON is not an exported program's ({type(e).__name__})") from None
    return reading


def initialise(graph: Graph, scheme: str, seed: int) -> dict[str, torch.Tensor]:
    """The runner's initial parameter values, the same for the same seed.

    ``default`` is PyTorch's own initialisation of each layer kind, recognised from the operator that
    reads the parameter (:attr:`Graph.inits`): weights of linear and convolution layers Kaiming-uniform with
    a = sqrt(5), i.e. uniform in +-1/sqrt(fan_in), their biases uniform in +-1/sqrt(fan_in) of their layer's
    weight; normalisation weights 1 and biases 0; embeddings N(0, 1) with the padding row 0. A parameter
    used as a matrix in ``matmul``/``mm``/``addmm`` gets a linear layer's rule for its fan-in (and the
    ``addmm`` bias its bias rule), a factor in ``mul``/``div`` 1, anything else 0. ``zeros``: all 0."""
    if scheme not in ("default", "zeros"):
        raise GraphRefused(f"initialisation scheme {scheme!r} is not default or zeros")
    gen = torch.Generator().manual_seed(int(seed))
    out: dict[str, torch.Tensor] = {}
    for name, (shape, dtype) in graph.params.items():
        t = torch.zeros(shape, dtype=dtype)
        init = graph.inits.get(name, Init("zeros"))
        if scheme == "default":
            if init.rule == "uniform":
                t.uniform_(-init.bound, init.bound, generator=gen)
            elif init.rule == "normal":
                t.normal_(0.0, 1.0, generator=gen)
                if init.zero_row is not None:
                    t[init.zero_row].zero_()
            elif init.rule == "ones":
                t.fill_(1.0)
        out[name] = t
    return out


# -- reading the document -------------------------------------------------------------------------------


@dataclass
class _Reading:
    document: dict[str, Any]
    output_sizes: list[dict[str, Any]]
    output_dtype: int
    params: dict[str, tuple[tuple[int, ...], torch.dtype]]
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    ops: set[str]
    inits: dict[str, Init]


def _refuse(message: str) -> GraphRefused:
    return GraphRefused(message)


def _shape_error(where: str) -> GraphRefused:
    return GraphRefused(f"the graph's JSON is not an exported program's (at {where}): send what export_graph exports")


def _quote(value: Any) -> str:
    return repr(value)[:80]


class _Reader:
    """Reads an exported program's JSON and writes the loader's own version of it (:meth:`read`)."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        """The document's tensor and size names -> the loader's."""
        self.kinds: dict[str, str] = {}
        """The loader's names -> ``tensor`` or ``size``."""
        self.tensor_values: dict[str, Any] = {}
        self.sym_int_values: dict[str, Any] = {}
        self.batch: str | None = None
        """The batch symbol's name in the document."""
        self.params_by_name: dict[str, str] = {}
        """The loader's names of parameters -> their parameter names."""
        self.new_tensor_values: dict[str, Any] = {}
        self.new_sym_int_values: dict[str, Any] = {}
        self.input_names: list[str] = []
        self.user_input: str | None = None
        """The loader's name of the model's input (the rows)."""
        self.input_shape: tuple[int, ...] = ()
        """The input's dimensions after the batch."""

    # small readers: each raises GraphRefused naming the place

    def obj(self, value: Any, where: str, required: frozenset[str] | set[str], allowed: frozenset[str] | None = None):
        if not isinstance(value, dict) or not required <= set(value) or not set(value) <= (allowed or required):
            raise _shape_error(where)
        return value

    def union(self, value: Any, where: str) -> tuple[str, Any]:
        if not isinstance(value, dict) or len(value) != 1:
            raise _shape_error(where)
        kind, payload = next(iter(value.items()))
        return str(kind), payload

    def list_(self, value: Any, where: str, at_most: int = MAX_TENSORS) -> list[Any]:
        if not isinstance(value, list):
            raise _shape_error(where)
        if len(value) > at_most:
            raise _refuse(f"the graph has more than {at_most} entries at {where}; use a smaller model")
        return value

    def int_(self, value: Any, where: str, low: int = -(2**63), high: int = 2**63 - 1) -> int:
        if type(value) is not int or not low <= value <= high:
            raise _shape_error(where)
        return value

    def float_(self, value: Any, where: str) -> float:
        if type(value) not in (int, float):
            raise _shape_error(where)
        if not math.isfinite(value) or abs(value) > 1e30:
            raise _refuse(f"{where} holds the number {_quote(value)}; the runner's operators take finite ones")
        return float(value)

    def bool_(self, value: Any, where: str) -> bool:
        if type(value) is not bool:
            raise _shape_error(where)
        return value

    def empty(self, value: Any, where: str) -> None:
        if value not in ({}, [], None):
            raise _refuse(f"the graph holds {where}: the runner trains plain tensor programs")

    # the document

    def read(self, doc: Any) -> _Reading:
        top = self.obj(doc, "the top", {"graph_module", "schema_version", "opset_version"}, _TOP)
        from torch._export.serde.schema import SCHEMA_VERSION

        version = self.obj(top["schema_version"], "schema_version", {"major", "minor"})
        major, minor = self.int_(version["major"], "schema_version"), self.int_(version["minor"], "schema_version")
        if major != SCHEMA_VERSION[0] or minor > SCHEMA_VERSION[1]:
            raise _refuse(
                f"the graph was written in torch.export schema {major}.{minor}, the runner reads "
                f"{SCHEMA_VERSION[0]}.{SCHEMA_VERSION[1]} and older minor versions: export it with torch "
                f"{torch.__version__}"
            )
        opset = self.obj(top["opset_version"], "opset_version", {"aten"})
        self.empty(top.get("guards_code"), "guard code")
        verifiers = self.list_(top.get("verifiers", []), "verifiers", 1)
        if any(v != "TRAINING" for v in verifiers):
            raise _refuse(f"the graph was exported for {_quote(verifiers)}, not for training; use export_graph")
        gm = self.obj(top["graph_module"], "graph_module", {"graph", "signature"}, _GRAPH_MODULE)
        self.empty(gm.get("treespec_namedtuple_fields"), "named tuples")
        if not isinstance(gm.get("metadata", {}), dict):
            raise _shape_error("graph_module.metadata")
        self.check_call_graph(gm.get("module_call_graph"))
        graph = self.obj(gm["graph"], "graph", {"inputs", "outputs", "nodes", "tensor_values"}, _GRAPH)
        tensor_values = graph["tensor_values"]
        if not isinstance(tensor_values, dict):
            raise _shape_error("graph.tensor_values")
        if len(tensor_values) > MAX_TENSORS:
            raise _refuse(f"the graph has more than {MAX_TENSORS} tensors; use a smaller model")
        self.tensor_values = tensor_values
        sym_values = graph.get("sym_int_values", {})
        if not isinstance(sym_values, dict) or len(sym_values) > MAX_NODES:
            raise _shape_error("graph.sym_int_values")
        self.sym_int_values = sym_values

        signature = self.obj(gm["signature"], "signature", {"input_specs", "output_specs"})
        self.check_kinds(signature["input_specs"])
        self.check_ops(graph["nodes"])
        for key, what in (
            ("custom_obj_values", "custom objects"),
            ("sym_bool_values", "symbolic conditions"),
            ("sym_float_values", "symbolic floats"),
        ):
            self.empty(graph.get(key), what)
        input_specs, params, user_input = self.read_inputs(signature["input_specs"], graph["inputs"])
        nodes, ops, uses = self.read_nodes(graph["nodes"])
        output, output_specs = self.read_outputs(graph["outputs"], signature["output_specs"])
        ranges = self.read_ranges(top.get("range_constraints", {}))

        meta = self.new_tensor_values
        input_sizes = meta[user_input]["sizes"]
        input_shape = tuple(int(s["as_int"]) for s in input_sizes[1:])
        document = {
            "graph_module": {
                "graph": {
                    "inputs": [{"as_tensor": {"name": spec_name}} for spec_name in self.input_names],
                    "outputs": [{"as_tensor": {"name": output}}],
                    "nodes": nodes,
                    "tensor_values": meta,
                    "sym_int_values": self.new_sym_int_values,
                    "sym_bool_values": {},
                    "is_single_tensor_return": self.bool_(
                        graph.get("is_single_tensor_return", False), "graph.is_single_tensor_return"
                    ),
                    "custom_obj_values": {},
                    "sym_float_values": {},
                },
                "signature": {"input_specs": input_specs, "output_specs": output_specs},
                "module_call_graph": [
                    {
                        "fqn": "",
                        "signature": {
                            "inputs": [],
                            "outputs": [],
                            "in_spec": _ONE_TENSOR_IN,
                            "out_spec": _ONE_TENSOR_OUT,
                            "forward_arg_names": [_FORWARD_ARG],
                        },
                    }
                ],
                "metadata": {},
                "treespec_namedtuple_fields": {},
            },
            "opset_version": {"aten": self.int_(opset["aten"], "opset_version.aten", 0, 10_000)},
            "range_constraints": ranges,
            "schema_version": {"major": SCHEMA_VERSION[0], "minor": SCHEMA_VERSION[1]},
            "verifiers": ["TRAINING"],
            "torch_version": torch.__version__,
            "guards_code": [],
        }
        return _Reading(
            document=document,
            output_sizes=meta[output]["sizes"],
            output_dtype=meta[output]["dtype"],
            params=params,
            input_shape=input_shape,
            input_dtype=_INPUT_DTYPES[meta[user_input]["dtype"]],
            ops=ops,
            inits=_inits(params, uses),
        )

    def check_call_graph(self, calls: Any) -> None:
        """The whole model's entry must take one tensor and return one; the rest (submodules) is dropped."""
        calls = self.list_(calls, "module_call_graph", MAX_TENSORS)
        root = calls[0] if calls and isinstance(calls[0], dict) else {}
        sig = root.get("signature") or {}
        if (
            root.get("fqn") != ""
            or not isinstance(sig, dict)
            or sig.get("in_spec") != _ONE_TENSOR_IN
            or sig.get("out_spec") != _ONE_TENSOR_OUT
        ):
            raise _refuse("the model must take one tensor and return one tensor")

    def check_kinds(self, specs: Any) -> None:
        """Parameters and the input only: no buffers, constants, objects or effects."""
        for i, spec in enumerate(self.list_(specs, "input_specs", MAX_TENSORS)):
            kind, payload = self.union(spec, f"input_specs[{i}]")
            if kind == "buffer":
                name = payload.get("buffer_name") if isinstance(payload, dict) else None
                raise _refuse(
                    f"the model has a buffer ({_quote(name)}), state the runner does not carry (BatchNorm's "
                    "running statistics, a tensor registered with register_buffer): use LayerNorm or GroupNorm "
                    "rather than BatchNorm, nn.Parameters for learned values and plain Python numbers for fixed ones"
                )
            if kind not in ("parameter", "user_input"):
                raise _refuse(
                    f"the model holds a {kind.replace('_', ' ')} the runner cannot recreate (a tensor that is "
                    "not a parameter, a custom object or an effect): make learned values nn.Parameters and fixed "
                    "ones plain Python numbers"
                )

    def check_ops(self, nodes: Any) -> None:
        """Every node's operator in :data:`ALLOWED_OPS`; the refusal names each other one, with what to do."""
        nodes = self.list_(nodes, "graph.nodes", MAX_NODES)
        others: dict[str, str] = {}
        for i, node in enumerate(nodes):
            target = node.get("target") if isinstance(node, dict) else None
            if not isinstance(target, str) or target not in ALLOWED_OPS:
                others.setdefault(
                    _quote(target), f"node {i} {_quote(node.get('name') if isinstance(node, dict) else None)}"
                )
        if others:
            named = "; ".join(f"{t} at {where}: {_hint(t)}" for t, where in list(others.items())[:8])
            raise _refuse(f"the graph calls operations the runner does not train: {named}")

    # names

    def define(self, name: Any, kind: str, where: str) -> str:
        if not isinstance(name, str) or len(name) > 200:
            raise _shape_error(where)
        if name in self.names:
            raise _refuse(f"the graph defines {_quote(name)} twice (at {where})")
        new = {"parameter": "p", "input": "x", "tensor": "t", "size": "n"}[kind] + str(len(self.names))
        self.names[name] = new
        self.kinds[new] = "size" if kind == "size" else "tensor"
        return new

    def ref(self, name: Any, kind: str, where: str) -> str:
        new = self.names.get(name) if isinstance(name, str) else None
        if new is None or self.kinds[new] != kind:
            raise _refuse(f"{where} reads {_quote(name)}, which is not a {kind} made before it")
        return new

    # sizes

    def sym_int(self, value: Any, where: str) -> dict[str, Any]:
        kind, payload = self.union(value, where)
        if kind == "as_int":
            return {"as_int": self.int_(payload, where, 0, 2**62)}
        if kind != "as_expr":
            raise _shape_error(where)
        expr = self.obj(payload, where, {"expr_str"}, frozenset({"expr_str", "hint"}))
        text = expr["expr_str"]
        factor = 1
        scaled = _SCALED.fullmatch(text) if isinstance(text, str) else None
        if scaled:
            factor, text = int(scaled.group(1)), scaled.group(2)
        if not isinstance(text, str) or not _SYMBOL.fullmatch(text) or factor < 1:
            raise _refuse(
                f"the graph's sizes hold expressions other than the batch size ({_quote(text)} at {where}): "
                "export with one Dim, the batch, and keep the other sizes fixed"
            )
        if self.batch is None:
            self.batch = text
        elif text != self.batch:
            raise _refuse("the graph's sizes depend on more than the batch size; export with one Dim, the batch")
        hint = expr.get("hint")
        out: dict[str, Any] = {"expr_str": _BATCH if factor == 1 else f"Mul(Integer({factor}), {_BATCH})"}
        if hint is not None:
            out["hint"] = {"as_int": self.int_(self.union(hint, where)[1], where, 0, 2**62)}
        return {"as_expr": out}

    def _batch_size_only(self, label: str, size: dict[str, Any], source: str | None, dim: Any) -> None:
        """A size read from a tensor (``sym_size.int``) is the batch size, read where the tensor holds it: the
        listing calls it ``batch``, so a parameter's length read as a size would be a number no one sees."""
        # Read from the input only: an intermediate tensor's declared sizes are the document's word, which
        # nothing checks before the graph runs (a size declared ``batch`` may be a parameter's length).
        batch = size.get("as_expr", {}).get("expr_str") == _BATCH
        if not batch or source is None or source != self.user_input or dim not in (0, -len(self.input_shape) - 1):
            raise _refuse(
                f"{label} reads a size other than the batch size; the runner's graphs read only the batch size "
                "from a tensor (x.shape[0]): write other sizes as numbers"
            )

    def tensor_meta(self, name: str, where: str, dtypes: set[int]) -> dict[str, Any]:
        meta = self.obj(self.tensor_values.get(name), f"tensor_values of {where}", _TENSOR_META)
        if type(meta["dtype"]) is not int or meta["dtype"] not in dtypes or meta["layout"] != _STRIDED:
            raise _refuse(f"{where} is a tensor of dtype {_quote(meta['dtype'])}; the runner trains float32 models")
        self.obj(meta["device"], f"device of {where}", {"type"}, frozenset({"type", "index"}))
        sizes = [self.sym_int(s, f"sizes of {where}") for s in self.list_(meta["sizes"], where, 16)]
        strides = [self.sym_int(s, f"strides of {where}") for s in self.list_(meta["strides"], where, 16)]
        if len(strides) != len(sizes):
            raise _shape_error(f"strides of {where}")
        return {
            "dtype": meta["dtype"],
            "sizes": sizes,
            "requires_grad": self.bool_(meta["requires_grad"], f"requires_grad of {where}"),
            "device": {"type": "cpu", "index": None},
            "strides": strides,
            "storage_offset": self.sym_int(meta["storage_offset"], f"storage_offset of {where}"),
            "layout": _STRIDED,
        }

    # inputs, nodes, outputs

    def read_inputs(self, specs: Any, graph_inputs: Any):
        specs = self.list_(specs, "input_specs", MAX_TENSORS)
        graph_inputs = self.list_(graph_inputs, "graph.inputs", MAX_TENSORS)
        if len(graph_inputs) != len(specs):
            raise _shape_error("graph.inputs")
        out: list[dict[str, Any]] = []
        params: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        user_inputs: list[str] = []
        for i, (spec, graph_input) in enumerate(zip(specs, graph_inputs, strict=True)):
            kind, payload = self.union(spec, f"input_specs[{i}]")  # parameter or user_input (check_kinds)
            if kind == "parameter":
                spec_ = self.obj(payload, f"input_specs[{i}]", {"arg", "parameter_name"})
                arg = self.obj(spec_["arg"], f"input_specs[{i}].arg", {"name"})
                pname = spec_["parameter_name"]
                if not isinstance(pname, str) or not _PARAMETER_NAME.fullmatch(pname) or pname in params:
                    raise _refuse(f"parameter name {_quote(pname)} is not a dotted name of words, or is repeated")
                if any(keyword.iskeyword(part) for part in pname.split(".")):
                    raise _refuse(f"parameter name {_quote(pname)} holds a Python keyword")
                new = self.define(arg["name"], "parameter", f"parameter {pname}")
                meta = self.tensor_meta(arg["name"], f"parameter {pname!r}", {_FLOAT})
                if any("as_int" not in s for s in meta["sizes"]):
                    raise _refuse(f"parameter {pname!r} has no fixed shape")
                shape = tuple(int(s["as_int"]) for s in meta["sizes"])
                if any(d <= 0 or d > MAX_PARAMETERS for d in shape):
                    raise _refuse(f"parameter {pname!r} has shape {shape}")
                params[pname] = (shape, torch.float32)
                self.params_by_name[new] = pname
                out.append({"parameter": {"arg": {"name": new}, "parameter_name": pname}})
            else:
                spec_ = self.obj(payload, f"input_specs[{i}]", {"arg"})
                tensor = self.obj(self.union(spec_["arg"], f"input_specs[{i}].arg")[1], "the input", {"name"})
                if "as_tensor" not in spec_["arg"]:
                    raise _refuse("the model's input must be one tensor")
                new = self.define(tensor["name"], "input", "the input")
                meta = self.tensor_meta(tensor["name"], "the input", set(_INPUT_DTYPES))
                user_inputs.append(new)
                out.append({"user_input": {"arg": {"as_tensor": {"name": new}}}})
            seen = self.obj(self.union(graph_input, f"graph.inputs[{i}]")[1], f"graph.inputs[{i}]", {"name"})
            if (
                "as_tensor" not in graph_input
                or not isinstance(seen["name"], str)
                or self.names.get(seen["name"]) != new
            ):
                raise _shape_error(f"graph.inputs[{i}]")
            self.new_tensor_values[new] = meta
            self.input_names.append(new)
        if len(user_inputs) != 1:
            raise _refuse(f"the model takes {len(user_inputs)} inputs; the runner gives it one tensor of rows")
        total = sum(math.prod(shape) for shape, _ in params.values())
        if total > MAX_PARAMETERS:
            raise _refuse(f"the model has {total:,} parameters, more than the runner trains ({MAX_PARAMETERS:,})")
        sizes = self.new_tensor_values[user_inputs[0]]["sizes"]
        if not sizes or sizes[0] != {"as_expr": {**sizes[0].get("as_expr", {}), "expr_str": _BATCH}}:
            raise _refuse("the input's first dimension must be the batch, exported as dynamic (a Dim)")
        if any("as_int" not in s or s["as_int"] < 1 for s in sizes[1:]):
            raise _refuse("the input's dimensions after the batch must be fixed")
        if math.prod(s["as_int"] for s in sizes[1:]) > MAX_ROW:
            raise _refuse(f"one input row has more than {MAX_ROW:,} values")
        self.user_input = user_inputs[0]
        self.input_shape = tuple(int(s["as_int"]) for s in sizes[1:])
        return out, params, user_inputs[0]

    def read_nodes(self, nodes: Any):
        nodes = self.list_(nodes, "graph.nodes", MAX_NODES)
        out: list[dict[str, Any]] = []
        ops: set[str] = set()
        uses: dict[str, list[_Use]] = {}
        for i, node in enumerate(nodes):
            node = self.obj(node, f"node {i}", {"target", "inputs", "outputs"}, _NODE)
            target = node["target"]
            label = f"node {i} ({_quote(node.get('name'))})"
            ops.add(target)  # one of ALLOWED_OPS (check_ops)
            inputs, tensors, numbers = self.read_arguments(target, node["inputs"], label)
            outputs = self.list_(node["outputs"], f"{label} outputs", 1)
            if len(outputs) != 1:
                raise _refuse(f"{label} returns {len(outputs)} values; the runner's operators return one")
            kind, payload = self.union(outputs[0], f"{label} output")
            if target == _SYM_SIZE:
                if kind != "as_sym_int":
                    raise _shape_error(f"{label} output")
                name = self.obj(payload, f"{label} output", {"as_name"})["as_name"]
                size = self.sym_int(self.sym_int_values.get(name), f"{label}'s size")
                self._batch_size_only(label, size, tensors.get("self"), numbers.get("dim"))
                new = self.define(name, "size", f"{label} output")
                self.new_sym_int_values[new] = size
                output = {"as_sym_int": {"as_name": new}}
            else:
                if kind != "as_tensor":
                    raise _shape_error(f"{label} output")
                name = self.obj(payload, f"{label} output", {"name"})["name"]
                new = self.define(name, "tensor", f"{label} output")
                self.new_tensor_values[new] = self.tensor_meta(name, label, {_FLOAT, _LONG, _INT})
                output = {"as_tensor": {"name": new}}
            op = target.removeprefix("torch.ops.aten.")
            read = {role: self.params_by_name[t] for role, t in tensors.items() if t in self.params_by_name}
            for role, pname in read.items():
                uses.setdefault(pname, []).append(_Use(op, role, read, numbers))
            out.append(
                {
                    "target": target,
                    "inputs": inputs,
                    "outputs": [output],
                    "metadata": {},
                    "is_hop_single_tensor_return": None,
                    "name": new,
                }
            )
        return out, ops, uses

    def read_arguments(self, target: str, given: Any, label: str):
        """A node's arguments checked against its operator's schema: names it takes, each once, of the kinds
        its types allow, none missing; rebuilt in the schema's order, positional while no argument before is
        left out (the loader decides, not the document)."""
        schema = _schema_args(target)
        by_name = {a.name: a for a in schema}
        read: dict[str, dict[str, Any]] = {}
        for j, named in enumerate(self.list_(given, label, 64)):
            named = self.obj(named, f"{label} input {j}", {"name", "arg"}, frozenset({"name", "arg", "kind"}))
            arg_name = named["name"]
            if not isinstance(arg_name, str) or arg_name not in by_name or arg_name in read:
                raise _refuse(f"{label} passes {_quote(arg_name)}, which {target} does not take (or twice)")
            kind = named.get("kind")
            if kind is not None and (type(kind) is not int or kind not in (1, 2)):
                raise _shape_error(f"{label} input {j}")
            where = f"{label} argument {arg_name!r}"
            arg = self.argument(named["arg"], where)
            param = by_name[arg_name]
            if next(iter(arg)) not in param.kinds:
                raise _refuse(
                    f"{where} is {_quote(next(iter(arg)))}, which {target} does not take there "
                    f"({'; '.join(sorted(param.kinds)) or 'the runner sets no such argument'}): export the model "
                    "again with export_graph"
                )
            if "as_string" in arg and arg["as_string"] not in _WORDS.get(arg_name, ()):
                raise _refuse(f"{where} is the string {_quote(arg['as_string'])}, which {target} does not take")
            read[arg_name] = arg
        missing = [a.name for a in schema if a.required and a.name not in read]
        if missing:
            raise _refuse(f"{label} calls {target} without {', '.join(missing)}")
        inputs: list[dict[str, Any]] = []
        tensors: dict[str, str] = {}
        numbers: dict[str, int] = {}
        positional = True
        for param in schema:
            if param.name not in read:
                positional = False
                continue
            arg = read[param.name]
            positional = positional and not param.keyword_only
            inputs.append({"name": param.name, "arg": arg, "kind": 1 if positional else 2})
            if "as_tensor" in arg:
                tensors[param.name] = arg["as_tensor"]["name"]
            elif "as_tensors" in arg:
                for k, t in enumerate(arg["as_tensors"]):
                    tensors[f"{param.name}[{k}]"] = t["name"]
            elif "as_int" in arg:
                numbers[param.name] = arg["as_int"]
        return inputs, tensors, numbers

    def argument(self, value: Any, where: str) -> dict[str, Any]:
        """One argument of an allowed operator, of the plain kinds only, rebuilt."""
        kind, payload = self.union(value, where)
        if kind == "as_tensor":
            return {kind: {"name": self.ref(self.obj(payload, where, {"name"})["name"], "tensor", where)}}
        if kind == "as_tensors":
            names = [self.obj(t, where, {"name"})["name"] for t in self.list_(payload, where, 256)]
            return {kind: [{"name": self.ref(n, "tensor", where)} for n in names]}
        if kind == "as_int":
            return {kind: self.int_(payload, where)}
        if kind == "as_ints":
            return {kind: [self.int_(v, where) for v in self.list_(payload, where, 16)]}
        if kind == "as_float":
            return {kind: self.float_(payload, where)}
        if kind == "as_floats":
            return {kind: [self.float_(v, where) for v in self.list_(payload, where, 16)]}
        if kind == "as_bool":
            return {kind: self.bool_(payload, where)}
        if kind == "as_bools":
            return {kind: [self.bool_(v, where) for v in self.list_(payload, where, 16)]}
        if kind == "as_none":
            return {kind: True}
        if kind == "as_string":
            if not isinstance(payload, str) or not any(payload in words for words in _WORDS.values()):
                raise _refuse(f"{where} is the string {_quote(payload)}; the runner's operators take none such")
            return {kind: payload}
        if kind == "as_sym_int":  # a plain integer is written as one, so the listing shows it as one
            sym = self.sym_argument(payload, where)
            return sym if "as_int" in sym else {kind: sym}
        if kind == "as_sym_ints":
            syms = [self.sym_argument(v, where) for v in self.list_(payload, where, 16)]
            return {"as_ints": [v["as_int"] for v in syms]} if all("as_int" in v for v in syms) else {kind: syms}
        raise _refuse(
            f"{where} is of kind {_quote(kind)}: the runner's operators take tensors, numbers and sizes only "
            "(no nested graphs, operators, objects, devices or dtypes)"
        )

    def sym_argument(self, value: Any, where: str) -> dict[str, Any]:
        kind, payload = self.union(value, where)
        if kind == "as_name":
            return {kind: self.ref(payload, "size", where)}
        if kind == "as_int":
            return {kind: self.int_(payload, where)}
        raise _shape_error(where)

    def read_outputs(self, graph_outputs: Any, specs: Any):
        specs = self.list_(specs, "output_specs", MAX_TENSORS)
        graph_outputs = self.list_(graph_outputs, "graph.outputs", MAX_TENSORS)
        kinds = {self.union(s, "output_specs")[0] for s in specs}
        if kinds - {"user_output"}:
            raise _refuse(
                "the graph changes its inputs, parameters or buffers in place, or returns gradients or effects "
                f"({', '.join(sorted(kinds - {'user_output'}))}); the runner trains models that only compute"
            )
        if len(specs) != 1 or len(graph_outputs) != 1:
            raise _refuse("the model must return one tensor")
        spec = self.obj(specs[0]["user_output"], "output_specs[0]", {"arg"})
        spec_kind, spec_payload = self.union(spec["arg"], "output_specs[0].arg")
        out_kind, out_payload = self.union(graph_outputs[0], "graph.outputs[0]")
        if spec_kind != "as_tensor" or out_kind != "as_tensor":
            raise _refuse("the model must return one tensor")
        name = self.obj(out_payload, "graph.outputs[0]", {"name"})["name"]
        if self.obj(spec_payload, "output_specs[0].arg", {"name"})["name"] != name:
            raise _shape_error("output_specs[0]")
        new = self.ref(name, "tensor", "the output")
        return new, [{"user_output": {"arg": {"as_tensor": {"name": new}}}}]

    def read_ranges(self, ranges: Any) -> dict[str, Any]:
        if not isinstance(ranges, dict) or len(ranges) > 1:
            raise _refuse("the graph's size ranges are not the batch size's alone; export with one Dim, the batch")
        out: dict[str, Any] = {}
        for name, bounds in ranges.items():
            if self.batch is None or f"Symbol('{name}', positive=True, integer=True)" != self.batch:
                raise _refuse("the graph's size ranges are not the batch size's; export with one Dim, the batch")
            bounds = self.obj(bounds, "range_constraints", {"min_val", "max_val"})
            for bound in (bounds["min_val"], bounds["max_val"]):
                if bound is not None:
                    self.int_(bound, "range_constraints", 0, 2**62)
            out["s0"] = {"min_val": 0, "max_val": None}  # any batch size: the runner's, not the document's
        return out


def _hint(target: str) -> str:
    """What to do instead of calling ``target`` (as quoted)."""
    name = target.strip("'\"")
    if "higher_order" in name:
        return (
            "a higher-order operation holds Python functions (torch.cond, torch.no_grad or enable_grad inside "
            "forward, vmap); compute without them"
        )
    if not name.startswith("torch.ops.aten."):
        return "a custom operator or Python function; use torch's own operations"
    op = name.split(".")[3] if name.count(".") >= 4 else name
    if op.endswith("_"):
        return f"an in-place operation; use the out-of-place form ({op[:-1]}, x = x + y rather than x += y)"
    if "batch_norm" in op:
        return "BatchNorm keeps running statistics; use LayerNorm or GroupNorm"
    if op.startswith(("rand", "bernoulli", "normal", "multinomial")) or "dropout" in op:
        return "a random operation; only nn.Dropout / F.dropout is allowed"
    return (
        "not in the runner's list; use standard layers (Linear, Conv1d/2d, pooling, LayerNorm/GroupNorm, "
        "Embedding, Dropout, activations) and tensor arithmetic"
    )


@dataclass(frozen=True)
class _Param:
    """One argument of an operator's schema."""

    name: str
    kinds: frozenset[str]
    required: bool
    keyword_only: bool


def _schema_args(target: str) -> list[_Param]:
    """The arguments of an allowed operator (``torch.ops.aten.<name>.<overload>``), in the schema's order."""
    _, _, _, name, overload = target.split(".")
    op = getattr(getattr(torch.ops.aten, name), overload)
    return [
        _Param(
            a.name,
            _KINDS.get(str(a.type), frozenset())
            | (_NUMBER if (f"{name}.{overload}", a.name) in _SCALAR_OTHER else set()),
            not a.has_default_value(),
            a.kwarg_only,
        )
        for a in op._schema.arguments
    ]


_NUMBER = frozenset({"as_int", "as_float"})
_SCALAR_OTHER = frozenset((f"{op}.Tensor", "other") for op in ("add", "sub", "mul", "div"))
"""Arithmetic with a Python number (``x / 8``, ``2 * x``): the exporter writes the number as the tensor
argument, and the operator takes it so."""


@dataclass(frozen=True)
class _Use:
    """A node reading a parameter: its operator, the argument, the node's parameters and integers by name."""

    op: str
    role: str
    params: dict[str, str]
    numbers: dict[str, int]


def _inits(params: dict[str, tuple[tuple[int, ...], torch.dtype]], uses: dict[str, list[_Use]]) -> dict[str, Init]:
    """Each parameter's ``default`` initialisation, from the first operator that reads it."""
    out: dict[str, Init] = {}
    for name, (shape, _) in params.items():
        if name not in uses:
            out[name] = Init("zeros", because="read by no operator")
            continue
        use = uses[name][0]
        out[name] = _init(shape, use, {k: params[v][0] for k, v in use.params.items()})
    return out


def _init(shape: tuple[int, ...], use: _Use, shapes: dict[str, tuple[int, ...]]) -> Init:
    """One parameter's rule; ``shapes`` are those of the parameters the same node reads, by argument."""
    op, role, because = use.op, use.role, f"{use.op}:{use.role}"

    def uniform(fan_in: int) -> Init:
        return Init("uniform", bound=1.0 / math.sqrt(max(1, fan_in)), because=because)

    if op == "linear.default" or op.startswith(("conv1d.", "conv2d.")):
        if role == "weight" and len(shape) >= 2:
            return uniform(math.prod(shape[1:]))
        if role == "bias":
            weight = shapes.get("weight")
            return uniform(math.prod(weight[1:]) if weight else shape[0])
    elif op in ("layer_norm.default", "group_norm.default"):
        return Init("ones" if role == "weight" else "zeros", because=because)
    elif op == "embedding.default" and role == "weight" and len(shape) == 2:
        padding = use.numbers.get("padding_idx", -1)  # -1: none (the layer has made others non-negative)
        return Init("normal", zero_row=padding if 0 <= padding < shape[0] else None, because=because)
    elif op in ("matmul.default", "mm.default", "addmm.default") and len(shape) >= 2:
        if role in ("other", "mat2"):  # x @ W: W is (fan_in, fan_out)
            return uniform(shape[-2])
        if role in ("self", "mat1"):  # W @ x: W is (fan_out, fan_in)
            return uniform(shape[-1])
    elif op == "addmm.default" and role == "self":  # the bias of x @ W
        mat2 = shapes.get("mat2")
        return uniform(mat2[0] if mat2 else shape[-1])
    elif op in ("mul.Tensor", "div.Tensor"):
        return Init("ones", because=because)
    return Init("zeros", because=because)


# -- building -------------------------------------------------------------------------------------------


BUILDING = threading.Lock()
"""Held while a graph is built and run on shapes (:func:`load_graph`), one at a time in the process: torch's
``ExportedProgramDeserializer`` keeps the graph it is deserialising in module state (``_CURRENT_DESERIALIZER``)
and refuses a second one meanwhile ("already set"), and the runner loads graphs from its socket's threads
(submit) and its workers' (a checkpoint's match, the fit to the rows, the weights' check) at once; a collision
refused a good graph, or failed a job whose budget was reserved."""


def _build(reading: _Reading) -> torch.nn.Module:
    """The module of a checked document; only under :data:`BUILDING` (torch's deserialiser is not re-entrant)."""
    from torch._export.serde import serialize as ser
    from torch._export.serde.schema import ExportedProgram as Schema

    state: dict[str, torch.Tensor] = {
        name: torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for name, (shape, dtype) in reading.params.items()
    }
    try:
        schema = ser._dict_to_dataclass(Schema, reading.document)
        program = ser.ExportedProgramDeserializer().deserialize(schema, state, {}, None)
        module: torch.nn.Module = program.module()
    except Exception as e:  # the deserializer's many ways to say no
        raise GraphRefused(f"the graph cannot be built: {type(e).__name__}: {str(e)[:300]}") from None
    return module


_CHECK_BATCHES = (1, 3)
"""Batch sizes the built graph is run at, on shapes only, before the loader returns it: 1 for the
trainer's per-sample gradients, and another."""


def _check_runs(module: torch.nn.Module, eval_module: torch.nn.Module, reading: _Reading) -> None:
    """Run both modules on the ``meta`` device (shapes and dtypes, no values, no data) and compare the output
    with the shape the document declares; a graph whose operators do not fit together is refused here rather
    than in the middle of training."""
    params = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in reading.params.items()}
    for batch in _CHECK_BATCHES:
        expected = tuple(_size(s, batch) for s in reading.output_sizes)
        x = torch.empty((batch, *reading.input_shape), dtype=reading.input_dtype, device="meta")
        for which in (module, eval_module):
            try:
                out = torch.func.functional_call(which, params, (x,))
            except Exception as e:  # an operator's own checks: shapes, ranges of arguments
                first = (str(e).strip().splitlines() or [""])[0][:300]
                raise GraphRefused(
                    f"the graph does not compute for a batch of {batch} ({type(e).__name__}: {first}): export "
                    "the model again with export_graph"
                ) from None
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise GraphRefused(f"the graph returns {got} for a batch of {batch}, not the {expected} it declares")
            if out.dtype != _INPUT_DTYPES[reading.output_dtype]:
                raise GraphRefused(f"the graph returns {out.dtype}, not the dtype it declares")


def _size(size: dict[str, Any], batch: int) -> int:
    """A size in the loader's own spelling, for a batch of ``batch``."""
    if "as_int" in size:
        return int(size["as_int"])
    expr = size["as_expr"]["expr_str"]
    return batch if expr == _BATCH else int(expr.removeprefix("Mul(Integer(").split(")")[0]) * batch


_PROBE_BATCHES = (5, 7)
"""Batch sizes the row analysis (:func:`rows_independent`) runs the graph at, on shapes only."""
_UNARY = frozenset(
    {"relu", "gelu", "silu", "sigmoid", "tanh", "elu", "leaky_relu", "hardtanh", "neg", "dropout", "contiguous"}
)
_ELEMENTWISE = frozenset({"add.Tensor", "sub.Tensor", "mul.Tensor", "div.Tensor"})
_PER_ROW = frozenset(
    {
        "linear.default",
        "conv1d.default",
        "conv1d.padding",
        "conv2d.default",
        "conv2d.padding",
        "layer_norm.default",
        "group_norm.default",
        "max_pool1d.default",
        "max_pool2d.default",
        "avg_pool1d.default",
        "avg_pool2d.default",
        "adaptive_avg_pool1d.default",
        "adaptive_avg_pool2d.default",
    }
)
"""Layers that compute each row of their first argument from that row alone (the rest: parameters)."""
_RESHAPES = frozenset({"flatten.using_ints", "view.default", "reshape.default"})


def rows_independent(module: torch.nn.Module, input_shape: tuple[int, ...], input_dtype: torch.dtype) -> bool:
    """Whether each row of the graph's output is computed from the same row of its input alone, read from
    the graph's structure: every operator keeps the batch as the first dimension of what it computes from the
    rows, and none reduces, reorders, selects or joins along it, nor multiplies one row by another. Decided
    from the operators, their arguments and the shapes the graph computes at two batch sizes (on the ``meta``
    device), never from values: a graph that mixes rows only for some values (a mean over the batch of a
    term that is zero for ordinary rows) is found as surely as one that always does. Clipping each row's
    gradient the fast way is right only for such a graph (:func:`paitient.services.jobs.persample`)."""
    try:
        return _rows_independent(module, input_shape, input_dtype)
    except Exception:  # an argument of a form the analysis does not read: the exact way, which is always right
        return False


def _rows_independent(module: torch.nn.Module, input_shape: tuple[int, ...], input_dtype: torch.dtype) -> bool:
    if not isinstance(module, torch.fx.GraphModule):
        return False
    shapes: list[dict[torch.fx.Node, tuple[int, ...]]] = []
    for batch in _PROBE_BATCHES:
        seen: dict[torch.fx.Node, tuple[int, ...]] = {}
        try:
            _ShapeRecorder(module, seen).run(torch.zeros((batch, *input_shape), dtype=input_dtype, device="meta"))
        except Exception:
            return False
        shapes.append(seen)
    state: dict[torch.fx.Node, str] = {}
    for node in module.graph.nodes:
        if node.op == "get_attr":
            state[node] = "fixed"
        elif node.op == "placeholder":
            state[node] = "rows"
        elif node.op == "call_function":
            state[node] = _row_state(node, state, shapes)
        elif node.op == "output":
            outs: list[torch.fx.Node] = []
            torch.fx.node.map_arg(node.args, outs.append)
            return all(state.get(o) == "rows" for o in outs) and "mixed" not in state.values()
        else:
            return False
    return False


class _ShapeRecorder(torch.fx.Interpreter):
    """Runs a graph on ``meta`` tensors (its parameters' shapes, no values), noting each tensor's shape."""

    def __init__(self, module: torch.fx.GraphModule, seen: dict[torch.fx.Node, tuple[int, ...]]):
        super().__init__(module)
        self.seen = seen

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return torch.empty_like(value, device="meta") if isinstance(value, torch.Tensor) else value

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.seen[n] = tuple(out.shape)
        return out


def _row_state(node: torch.fx.Node, state: dict[torch.fx.Node, str], shapes: list[dict[Any, tuple[int, ...]]]) -> str:
    """``rows`` (batch first, each row from its own), ``fixed`` (no row read) or ``mixed``, of one call."""
    op = str(node.target).removeprefix("aten.")
    args = list(node.args)
    inputs: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), inputs.append)
    kinds = [state.get(n, "mixed") for n in inputs]
    if op == "sym_size.int":
        source = args[0] if args else None
        read = isinstance(source, torch.fx.Node) and state.get(source) == "rows" and args[1] == 0
        return "fixed" if read else "mixed"
    if "mixed" in kinds:
        return "mixed"
    if "rows" not in kinds:
        return "fixed"
    if node.kwargs:  # the rules below read arguments by position, as the exporter writes them
        return "mixed"
    sized = [n for n in inputs if n.op == "call_function" and str(n.target) == "aten.sym_size.int"]
    if sized and op not in _RESHAPES and op != "slice.Tensor":
        return "mixed"  # a size as an index or a bound makes each row's value depend on how many rows there are

    def rows(i: int) -> bool:
        arg = args[i] if i < len(args) else None
        return isinstance(arg, torch.fx.Node) and state.get(arg) == "rows"

    def rank(i: int) -> int:
        return len(shapes[0].get(args[i], ())) if isinstance(args[i], torch.fx.Node) else 0

    def dims(value: Any, of: int) -> list[int] | None:
        values = value if isinstance(value, list | tuple) else [value]
        if of == 0 or not all(isinstance(d, int) for d in values):
            return None
        return [d % of for d in values]

    def batch_first() -> bool:
        return all(seen.get(node, ())[:1] == (batch,) for seen, batch in zip(shapes, _PROBE_BATCHES, strict=True))

    only_first = rows(0) and all(state.get(n) != "rows" for n in inputs if n is not args[0])
    base = op.split(".")[0]
    if base in _UNARY:
        ok = only_first
    elif op in _ELEMENTWISE:
        ok = all(len(shapes[0].get(n, ())) == len(shapes[0].get(node, ())) for n in inputs if state[n] == "rows")
    elif op in _PER_ROW:
        shape = args[1] if op == "layer_norm.default" and isinstance(args[1], list | tuple) else ()
        ok = only_first and (op != "layer_norm.default" or 0 < len(shape) < rank(0))
    elif op == "embedding.default":
        ok = rows(1) and isinstance(args[0], torch.fx.Node) and state.get(args[0]) == "fixed"
    elif op == "addmm.default":
        ok = rows(1) and not rows(2) and rank(1) >= 2
    elif op in ("mm.default", "matmul.default"):
        ok = only_first and rank(0) >= 2
    elif op in ("softmax.int", "log_softmax.int"):
        ok = only_first and dims(args[1], rank(0)) not in (None, [0])
    elif op in ("mean.dim", "sum.dim_IntList"):
        picked = dims(args[1], rank(0)) if len(args) > 1 and args[1] is not None else None
        ok = only_first and picked is not None and 0 not in picked
    elif op in _RESHAPES:
        ok = only_first
    elif op == "unsqueeze.default":
        ok = only_first and dims(args[1], rank(0) + 1) not in (None, [0])
    elif op in ("squeeze.dim", "squeeze.dims"):
        picked = dims(args[1], rank(0))
        ok = only_first and picked is not None and 0 not in picked
    elif op == "permute.default":
        picked = dims(args[1], rank(0))
        ok = only_first and picked is not None and picked[0] == 0
    elif op == "transpose.int":
        picked = dims([args[1], args[2]], rank(0))
        ok = only_first and picked is not None and 0 not in picked
    elif op == "t.default":
        ok = only_first and rank(0) < 2
    elif op == "select.int":
        ok = only_first and dims(args[1], rank(0)) not in (None, [0])
    elif op == "slice.Tensor":
        at = dims(args[1] if len(args) > 1 else 0, rank(0))
        whole = (len(args) < 3 or args[2] in (None, 0)) and (len(args) < 5 or args[4] in (None, 1))
        # the batch as a bound only where it is the batch's own dimension (x[:n], all of it)
        ok = only_first and at is not None and (at == [0] and whole or at != [0] and not sized)
    elif op == "cat.default":
        tensors = args[0] if isinstance(args[0], list | tuple) else []
        first = tensors[0] if tensors and isinstance(tensors[0], torch.fx.Node) else None
        of = len(shapes[0].get(first, ())) if first is not None else 0
        ok = (
            bool(tensors)
            and all(isinstance(t, torch.fx.Node) and state.get(t) == "rows" for t in tensors)
            and dims(args[1] if len(args) > 1 else 0, of) not in (None, [0])
        )
    else:
        ok = False
    return "rows" if ok and batch_first() else "mixed"


def _without_dropout(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` whose dropout nodes pass their input through."""
    evaluated = copy.deepcopy(module)
    if not isinstance(evaluated, torch.fx.GraphModule):
        raise GraphRefused("the graph cannot be built: the exporter gave no graph module")
    for node in list(evaluated.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.dropout.default:
            node.replace_all_uses_with(node.args[0])
            evaluated.graph.erase_node(node)
    evaluated.graph.lint()
    evaluated.recompile()
    return evaluated
