"""What a researcher may ask of a training job, checked field by field before anything is queued. Pure.

A job names a dataset, a target column, the features (default: every numeric column but the target), a
loss, the DP parameters (clipping bound, target epsilon; delta is the project's) and the optimiser, and a
list of *declarative* preprocessing steps: constants the researcher chose, never code:

- ``{"op": "standardise", "columns": [...], "mean": [...], "std": [...]}``: ``(x - mean) / std``;
- ``{"op": "fill", "columns": [...], "value": v}``: a missing value becomes ``v``;
- ``{"op": "onehot", "column": c, "categories": [...]}``: ``c`` becomes one 0/1 feature per category
  (``c=<category>``), a value outside them all zeros.

A standardise step without ``mean``/``std`` and a onehot step without ``categories`` (or either with
``"from": "catalogue"``) take them from the catalogue of the dataset version the runner reads
(:mod:`paitient.rules.catalogue`); the signed record holds the constants it used.

What the researcher writes into the request and the signed record states leaves with the weights, so it is
kept to what a steward reads at a glance: each number of their own that the record carries (the clipping
bound, the target epsilon, a standardise step's means and spreads, a fill value) has at most
:data:`SIGNIFICANT_DIGITS` significant digits, and a onehot step's own categories must be among those the
catalogue names for the column (checked by the runner against the version it reads): a value too rare for
the catalogue to name cannot leave as a category.

``checkpoint`` (optional) names a pretrained checkpoint of the operator's registry to start from instead
of the runner's own initialisation: a name, never values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from paitient.config import NAME_RE

LOSSES = ("cross_entropy", "bce_with_logits", "smooth_hinge", "mse")
OPTIMIZERS = ("sgd", "adam")
INIT_SCHEMES = ("default", "zeros")
"""How the runner starts a model's parameters without a checkpoint: PyTorch's own initialisation of each
layer kind, or all 0 (a linear model trained under DP from 0 keeps no random start in its noise)."""
MAX_COLUMNS = 4096
MAX_STEPS_IN_PREPROCESSING = 64
MAX_CATEGORIES = 1000
MAX_COLUMN_NAME = 200
SIGNIFICANT_DIGITS = 4
"""Significant digits of a number of the researcher's that the signed record carries (enough for any
standardisation or clipping bound; more would be a few dozen bits of the kernel's choice each)."""
IN_THE_RECORD = frozenset({"max_grad_norm", "target_epsilon"})
"""Numbers of the request that the signed record states as given."""
HOLDOUT_DIGITS = 2
"""Significant digits of ``holdout``: the record states the rows it held out, so a share of any precision
would choose that count among hundreds."""
SHORT_NUMBERS = {"holdout": HOLDOUT_DIGITS, "lr": 2, "momentum": 2}
"""Numbers of the request with a few significant digits only: ``holdout`` (above), ``lr`` and ``momentum``,
which the record does not state but which move the released weights, so a learning rate of any precision
would be a few bits of the kernel's choice in them."""


class SpecError(ValueError):
    """A job request that cannot be run; the message names the field and what it must be."""


MAX_STEPS = 20_000
"""The most DP-SGD steps a job may take (``epochs * n_train / batch_size``: an epoch is ``1 / sample_rate``
steps). The runner plans a job's noise with Opacus' PRV accountant in its own (root) process, before anything
is reserved; the accountant's mesh is finer by ``sqrt(steps)``, and its bisection tries about 15 noises.
20,000 steps is 43 epochs of one row per batch on 455 rows, 100 epochs of batches of 0.5% of the rows;
measured (Opacus 1.6, 455 rows), planning epsilon 1 over 19,565 steps of one row takes 3.8 s and 0.3 GB, epsilon 3
4.9 s and 0.46 GB, epsilon 1 over 20,000 steps of 64 rows 1.6 s. The RDP accountant's work does not grow with
the steps."""
ACCOUNTANT_EPS_ERROR = 0.01
"""The PRV accountant's epsilon error (Opacus' default, which the runner keeps)."""
MAX_ACCOUNTING_POINTS = 1_000_000
"""The most points the PRV accountant may discretise one evaluation over: its domain ``[-L, L]`` is as wide as the
epsilon of the noise tried (``L`` is at least it), its mesh ``0.01 / sqrt(steps * ln(12000 / delta) / 2)``.
Measured (Opacus 1.6, numpy FFT): 170 to 450 bytes and about a microsecond a point, so one evaluation takes at
most about 0.45 GB and 1 s, freed before the next. Unbounded, Opacus' bisection for epsilon 100 over 9,100 steps
of one row in 455 tried noises needing tens of millions of points (the runner: 3.3 GB and a MemoryError; 1000
epochs: 22.6 GB and the OOM killer); epsilon 100 over 1,000 steps alone took 2.8 GB and 31 s."""


def accounting_points(target_epsilon: float, steps: int, delta: float) -> int:
    """The fewest points the PRV accountant discretises over at the noise that reaches ``target_epsilon`` in
    ``steps`` steps at ``delta`` (a lower bound: Opacus' domain is ``[-L, L]`` with ``L`` at least the
    epsilon at a thousandth of delta, plus 3, and its mesh ``0.01 / sqrt(steps * ln(12 / (delta / 1000)) / 2)``).
    A larger ``delta`` gives fewer points, so the bound holds for any delta at most the one given."""
    delta_error = delta / 1000
    half_width = max(0.99 * target_epsilon - ACCOUNTANT_EPS_ERROR, ACCOUNTANT_EPS_ERROR) + 3
    mesh = ACCOUNTANT_EPS_ERROR / math.sqrt(steps * math.log(12 / delta_error) / 2)
    return int(2 * half_width / mesh)


def check_steps(spec: Mapping[str, Any], n_train: int) -> int:
    """The steps the request takes on ``n_train`` training rows, once they are within what the runner plans:
    at most :data:`MAX_STEPS`, and an accountant's work for its epsilon within :data:`MAX_ACCOUNTING_POINTS`
    (at the largest delta a run on ``n_train`` rows may have, ``1 / (10 n_train)``); else :class:`SpecError`
    saying what to ask for instead."""
    n = max(1, int(n_train))
    epochs, batch = int(spec["epochs"]), min(int(spec["batch_size"]), n)
    steps = max(1, round(epochs * n / batch))
    if steps > MAX_STEPS:
        most = max(1, MAX_STEPS * batch // n)
        raise SpecError(
            f"{epochs} epochs of batch_size {batch} on {n} training rows is {steps} steps, more than the "
            f"{MAX_STEPS} the runner plans: ask for at most {most} epochs at this batch_size, or a larger "
            f"batch_size (at least {math.ceil(epochs * n / MAX_STEPS)} for {epochs} epochs)"
        )
    epsilon = float(spec["target_epsilon"])
    points = accounting_points(epsilon, steps, 1 / (10 * n))
    if points > MAX_ACCOUNTING_POINTS:
        raise SpecError(
            f"target_epsilon {epsilon:g} over {steps} steps ({epochs} epochs of batch_size {batch} on {n} "
            f"training rows) is more than the privacy accountant can plan within its bound ({points} points, "
            f"at most {MAX_ACCOUNTING_POINTS}): ask for fewer epochs or a larger batch_size (fewer steps), or a "
            "smaller target_epsilon"
        )
    return steps


_NUMBERS: dict[str, tuple[float, float, bool, Any]] = {
    # name: (low, high, whole number, default; None: required)
    "epochs": (1, 1000, True, None),
    "batch_size": (1, 1_000_000, True, None),
    "max_grad_norm": (1e-6, 1e3, False, None),
    "target_epsilon": (1e-3, 100.0, False, None),
    "lr": (1e-8, 10.0, False, 0.1),
    "momentum": (0.0, 0.99, False, 0.0),
    "holdout": (0.05, 0.5, False, 0.2),
}
_FIELDS = {
    "dataset",
    "project",
    "target",
    "features",
    "loss",
    "optimizer",
    "init",
    "preprocessing",
    "checkpoint",
    *_NUMBERS,
}


def _name(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_COLUMN_NAME or any(ord(c) < 32 for c in value):
        raise SpecError(
            f"{field} must be a column name (1 to {MAX_COLUMN_NAME} printable characters); got {value!r:.60}"
        )
    return value


def _names(field: str, value: Any, *, least: int = 1) -> list[str]:
    if not isinstance(value, list) or not least <= len(value) <= MAX_COLUMNS:
        raise SpecError(f"{field} must be a list of {least} to {MAX_COLUMNS} column names")
    names = [_name(field, v) for v in value]
    if len(set(names)) != len(names):
        raise SpecError(f"{field} names a column twice")
    return names


def _number(field: str, value: Any, low: float, high: float, whole: bool) -> float | int:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (whole and value != int(value)) or not low <= value <= high:
        kind = "a whole number" if whole else "a number"
        raise SpecError(f"{field} must be {kind} from {low:g} to {high:g}; got {value!r:.40}")
    return int(value) if whole else float(value)


SMALLEST, LARGEST = 1e-6, 1e9
"""The sizes a number of the researcher's in the record may have (or 0): within them its exponent is a few bits."""


def _short(field: str, value: float) -> float:
    """``value`` when it has at most :data:`SIGNIFICANT_DIGITS` significant digits and is 0 or between
    :data:`SMALLEST` and :data:`LARGEST` in size (-0.0 becomes 0.0), else :class:`SpecError`."""
    if value == 0:
        return 0.0
    if not SMALLEST <= abs(value) <= LARGEST:
        raise SpecError(
            f"{field} must be 0 or between {SMALLEST:g} and {LARGEST:g} in size (it leaves with the signed "
            f"record); got {value!r:.40}"
        )
    rounded = float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    if rounded != value:
        raise SpecError(
            f"{field} must have at most {SIGNIFICANT_DIGITS} significant digits (it leaves with the signed "
            f"record, which a steward reads): give {rounded:g} instead of {value!r:.40}"
        )
    return value


def _numbers(field: str, value: Any, n: int) -> list[float]:
    if not isinstance(value, list) or len(value) != n:
        raise SpecError(f"{field} must be a list of {n} numbers, one per column")
    return [_short(field, float(_number(field, v, -1e300, 1e300, False))) for v in value]


def check_step(step: Any) -> dict[str, Any]:
    if not isinstance(step, Mapping):
        raise SpecError("each preprocessing step is an object with an 'op'")
    op = step.get("op")
    if op == "standardise":
        _only(step, {"op", "columns", "mean", "std", "from"}, "a standardise step")
        columns = _names("standardise columns", step.get("columns"))
        if _from_catalogue(step, ("mean", "std")):
            return {"op": op, "columns": columns, "from": "catalogue"}
        mean = _numbers("standardise mean", step.get("mean"), len(columns))
        std = _numbers("standardise std", step.get("std"), len(columns))
        if any(s <= 0 for s in std):
            raise SpecError("standardise std must be above 0 for every column")
        return {"op": op, "columns": columns, "mean": mean, "std": std}
    if op == "fill":
        _only(step, {"op", "columns", "value"}, "a fill step")
        columns = _names("fill columns", step.get("columns"))
        return {
            "op": op,
            "columns": columns,
            "value": _short("fill value", float(_number("fill value", step.get("value"), -1e300, 1e300, False))),
        }
    if op == "onehot":
        _only(step, {"op", "column", "categories", "from"}, "a onehot step")
        if _from_catalogue(step, ("categories",)):
            return {"op": op, "column": _name("onehot column", step.get("column")), "from": "catalogue"}
        categories = step.get("categories")
        if not isinstance(categories, list) or not 1 <= len(categories) <= MAX_CATEGORIES:
            raise SpecError(f"onehot categories must be a list of 1 to {MAX_CATEGORIES} values")
        if not all(isinstance(c, str | int) and not isinstance(c, bool) for c in categories):
            raise SpecError("onehot categories are strings or whole numbers")
        if len({(type(c), c) for c in categories}) != len(categories):
            raise SpecError("onehot categories name a category twice")
        return {"op": op, "column": _name("onehot column", step.get("column")), "categories": list(categories)}
    raise SpecError(f"preprocessing op {op!r:.40} is not one of standardise, fill, onehot")


def _from_catalogue(step: Mapping[str, Any], constants: tuple[str, ...]) -> bool:
    """Does the step take its constants from the catalogue (``"from": "catalogue"``, or none given)?"""
    source = step.get("from")
    given = [k for k in constants if step.get(k) is not None]
    if source is None:
        return not given
    if source != "catalogue":
        raise SpecError(f"{step['op']} from= must be 'catalogue'; got {source!r:.40}")
    if given:
        raise SpecError(f"{step['op']} takes {', '.join(given)} from the catalogue or from you, not both")
    return True


def _only(obj: Mapping[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(str(k) for k in obj if k not in allowed)
    if unknown:
        raise SpecError(f"{what} takes {', '.join(sorted(allowed))}; not {', '.join(unknown)}")


def check_request(args: Mapping[str, Any]) -> dict[str, Any]:
    """The job request as the runner keeps it, every field checked; raises :class:`SpecError`."""
    _only(args, _FIELDS, "a job")
    dataset = args.get("dataset")
    if not isinstance(dataset, str) or not NAME_RE.match(dataset):
        raise SpecError(f"dataset must be a dataset's name; got {dataset!r:.60}")
    project = args.get("project")
    if project is not None and (not isinstance(project, str) or not NAME_RE.match(project)):
        raise SpecError(f"project must be a project's name; got {project!r:.60}")
    spec: dict[str, Any] = {"dataset": dataset, "project": project, "target": _name("target", args.get("target"))}
    checkpoint = args.get("checkpoint")
    if checkpoint is not None and (not isinstance(checkpoint, str) or not NAME_RE.match(checkpoint)):
        raise SpecError(
            f"checkpoint must be the name of a checkpoint in the registry (jobs.checkpoints() lists them); "
            f"got {checkpoint!r:.60}"
        )
    spec["checkpoint"] = checkpoint
    init = args.get("init", "default")
    if init not in INIT_SCHEMES:
        raise SpecError(f"init must be one of {', '.join(INIT_SCHEMES)}; got {init!r:.40}")
    if checkpoint is not None and init != "default":
        raise SpecError("init is how parameters start without a checkpoint: give a checkpoint or init, not both")
    spec["init"] = init
    features = args.get("features")
    spec["features"] = None if features is None else _names("features", features)
    if spec["features"] is not None and spec["target"] in spec["features"]:
        raise SpecError("the target cannot be one of the features")
    loss = args.get("loss", "cross_entropy")
    if loss not in LOSSES:
        raise SpecError(f"loss must be one of {', '.join(LOSSES)}; got {loss!r:.40}")
    optimizer = args.get("optimizer", "sgd")
    if optimizer not in OPTIMIZERS:
        raise SpecError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r:.40}")
    spec["loss"], spec["optimizer"] = loss, optimizer
    for name, (low, high, whole, default) in _NUMBERS.items():
        value = args.get(name, default)
        if value is None:
            raise SpecError(f"{name} is required: {'a whole number' if whole else 'a number'} from {low:g} to {high:g}")
        spec[name] = _number(name, value, low, high, whole)
        if name in IN_THE_RECORD:
            _short(name, spec[name])
        digits = SHORT_NUMBERS.get(name)
        if digits is not None and float(f"{spec[name]:.{digits}g}") != spec[name]:
            why = "the record states the rows held out" if name == "holdout" else "it moves the released weights"
            raise SpecError(
                f"{name} must have at most {digits} significant digits ({why}): give "
                f"{float(f'{spec[name]:.{digits}g}'):g} instead of {spec[name]!r:.40}"
            )
    if spec["momentum"] and optimizer != "sgd":
        raise SpecError(f"momentum is sgd's; {optimizer} takes none: leave momentum out, or use optimizer='sgd'")
    steps = args.get("preprocessing", [])
    if not isinstance(steps, list) or len(steps) > MAX_STEPS_IN_PREPROCESSING:
        raise SpecError(f"preprocessing must be a list of at most {MAX_STEPS_IN_PREPROCESSING} steps")
    spec["preprocessing"] = [check_step(s) for s in steps]
    return spec


OP_ORDER = ("fill", "standardise", "onehot")
"""The order the runner applies preprocessing in, whatever order the steps were given in."""


def canonical_preprocessing(steps: list[dict[str, Any]], columns: list[str]) -> list[dict[str, Any]]:
    """The steps (constants resolved) as the runner applies them and the signed record states them, so that
    nothing of their arrangement is the researcher's to choose: the fills first, then the standardising,
    then the one-hot encoding; each op names a column at most once; columns in the dataset's order
    (``columns``); the standardise steps merged into one from the catalogue and one with the researcher's
    constants, fills of the same value merged, one onehot step per column. :class:`SpecError` for a column the
    dataset lacks or one an op names twice."""
    position = {c: i for i, c in enumerate(columns)}
    named: dict[str, set[str]] = {op: set() for op in OP_ORDER}
    for step in steps:
        op = step["op"]
        if op == "standardise" and ("mean" not in step or "std" not in step):
            raise SpecError("a standardise step's constants are not resolved yet: resolve them from the catalogue")
        for c in step["columns"] if "columns" in step else [step["column"]]:
            if c not in position:
                raise SpecError(f"{op} names column {c!r:.80}, which the dataset does not have")
            if c in named[op]:
                raise SpecError(f"{op} names column {c!r:.80} twice; name each column in one {op} step only")
            named[op].add(c)
    both = sorted(named["standardise"] & named["onehot"], key=position.__getitem__)
    if both:
        raise SpecError(
            f"{', '.join(map(repr, both))} is both standardised and one-hot encoded; a column is one or the other "
            "(one-hot encoding compares its values with the categories, so standardise only number columns)"
        )
    out: list[dict[str, Any]] = []
    fills: dict[float, list[str]] = {}
    for step in steps:
        if step["op"] == "fill":
            fills.setdefault(float(step["value"]), []).extend(step["columns"])
    for value, cols in sorted(fills.items(), key=lambda kv: min(position[c] for c in kv[1])):
        out.append({"op": "fill", "columns": sorted(cols, key=position.__getitem__), "value": value})
    for catalogue in (True, False):
        group = [s for s in steps if s["op"] == "standardise" and (s.get("from") == "catalogue") == catalogue]
        if group:
            rows = sorted(
                (t for s in group for t in zip(s["columns"], s["mean"], s["std"], strict=True)),
                key=lambda t: position[t[0]],
            )
            merged: dict[str, Any] = {
                "op": "standardise",
                "columns": [r[0] for r in rows],
                "mean": [r[1] for r in rows],
                "std": [r[2] for r in rows],
            }
            out.append({**merged, "from": "catalogue"} if catalogue else merged)
    out.extend(sorted((dict(s) for s in steps if s["op"] == "onehot"), key=lambda s: position[s["column"]]))
    return out
