"""What an airlock request asks for, as typed and checked values: :class:`RequestSpec` and its parts.

``airlock.request(path, kind=..., justification=..., ...)`` builds a :class:`RequestSpec` from its
keyword arguments (:func:`request_spec`); ``airlock.request(path, spec)`` takes one made beforehand::

    from paitient import airlock
    spec = airlock.RequestSpec(
        kind="table",
        justification="Table 2 of the paper",
        recipe=airlock.TableRecipe(dataset="breast_cancer", index=["age"], values="mean radius", aggfunc="mean"),
    )
    airlock.request("radius_by_age.csv", spec)

Each value is checked when it is made and :class:`RequestSpecError` says what to change, before the
file is opened. These checks only save a round trip: the airlock service checks every request it
receives again (the kernel is not trusted), and runs the disclosure checks on what it stored.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict, TypeGuard, Unpack, get_args

from paitient.kernel.airlock.source import SourceNotFound, class_source
from paitient.rules.disclosure import TableError, validate_recipe

Kind = Literal["table", "figure", "weights", "other"]
"""``table`` (CSV or Parquet), ``figure``, ``weights`` (safetensors) or ``other``."""
Loss = Literal["cross_entropy", "bce", "mse"]
"""The loss the membership-inference audit computes per row."""
Preprocess = Literal["none", "standardize"]
"""``standardize``: the audit standardises the features with the training rows' mean and std."""
Aggfunc = Literal["count", "mean", "sum", "median", "std", "min", "max"]
"""How a table's cells were computed from the dataset's rows (the disclosure rules' ``AGGFUNCS``)."""

KINDS: tuple[Kind, ...] = get_args(Kind)
TableFormat = Literal["csv", "xlsx"]
"""What a table is released as (the airlock re-writes it from its parsed cells either way)."""
TABLE_FORMATS: tuple[TableFormat, ...] = get_args(TableFormat)
LOSSES: tuple[Loss, ...] = get_args(Loss)
PREPROCESSING: tuple[Preprocess, ...] = get_args(Preprocess)

MAX_JUSTIFICATION = 10_000
"""Characters; the service refuses longer justifications."""
MAX_MODEL_SOURCE = 200_000
"""Characters of model source; the service refuses more."""


class RequestSpecError(ValueError):
    """A request the airlock would not take; the message says which value and what to give instead."""


def _name(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _whole(value: object) -> TypeGuard[numbers.Integral]:
    """A whole number (Python's or numpy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _names(value: object) -> tuple[str, ...] | None:
    """A column name or a list of them as a tuple; None when it is neither."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


@dataclass(frozen=True, kw_only=True)
class TableRecipe:
    """How a table was computed from a dataset, so the airlock can recompute it and check every cell
    (minimum count, dominance, p-ratio) against the dataset's rows."""

    dataset: str
    """The project's dataset the table comes from."""
    index: Sequence[str]
    """The column(s) whose values are the table's rows (a name or a list of names); stored as a tuple."""
    columns: Sequence[str] = ()
    """The column(s) whose values are the table's columns; none for a one-column table."""
    values: str | None = None
    """The column aggregated in each cell; None for a table of counts."""
    aggfunc: Aggfunc | None = None
    """How cells aggregate ``values``; None: ``count`` without values, ``mean`` with."""
    version: int | None = None
    """The dataset's version; None: the current one."""
    filter: Mapping[str, Any] | None = None
    """The table's population: ``{column: condition}`` (a value, a list, or ``in``/``not``/``<``/``<=``/``>``/
    ``>=``), e.g. ``{"age": {"<": 90}}``; None: every row. The airlock compares populations across releases."""

    def __post_init__(self) -> None:
        for key in ("index", "columns"):
            names = _names(getattr(self, key))
            if names is None:
                raise RequestSpecError(f"recipe {key!r} must be a column name or a list of column names")
            object.__setattr__(self, key, names)  # frozen: normalised once, here
        if self.values is not None and not _name(self.values):
            raise RequestSpecError(f"recipe 'values' must be the name of a column, got {self.values!r}")
        version: object = self.version
        if version is not None and not (_whole(version) and int(version) >= 1):
            raise RequestSpecError(f"recipe 'version' must be a dataset version (1, 2, ...), got {self.version!r}")
        try:
            validate_recipe(self._wire())
        except TableError as e:
            raise RequestSpecError(str(e)) from None

    @property
    def resolved_aggfunc(self) -> Aggfunc:
        """``aggfunc``, or its default (``count`` without values, ``mean`` with)."""
        if self.aggfunc is not None:
            return self.aggfunc
        return "count" if self.values is None else "mean"

    def _wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dataset": self.dataset, "index": list(self.index), "columns": list(self.columns)}
        if self.values is not None:
            out["values"] = self.values
        if self.aggfunc is not None:
            out["aggfunc"] = self.aggfunc
        if self.version is not None:
            out["version"] = self.version
        if self.filter is not None:
            out["filter"] = dict(self.filter)
        return out

    def to_wire(self) -> dict[str, Any]:
        """The recipe as the airlock service takes it, with the aggregation spelt out."""
        return {**self._wire(), "aggfunc": self.resolved_aggfunc}

    @classmethod
    def from_dict(cls, recipe: Mapping[str, Any]) -> TableRecipe:
        """A recipe from ``{"dataset", "index", "columns"?, "values"?, "aggfunc"?, "version"?}``."""
        if not isinstance(recipe, Mapping):
            raise RequestSpecError("the table recipe must be a dict with dataset, index, columns, values, aggfunc")
        try:
            validate_recipe(dict(recipe))
        except TableError as e:
            raise RequestSpecError(str(e)) from None
        return cls(**recipe)


@dataclass(frozen=True, kw_only=True)
class HoldoutSplit:
    """Rows held out of training by :func:`paitient.rules.split.split_indices` with these numbers."""

    holdout: float = 0.3
    """The fraction of rows held out, in (0, 1)."""
    seed: int = 0
    """The seed of the split."""

    def __post_init__(self) -> None:
        holdout: object = self.holdout
        seed: object = self.seed
        if isinstance(holdout, bool) or not isinstance(holdout, numbers.Real) or not 0 < float(holdout) < 1:
            raise RequestSpecError(f"split holdout must be a fraction between 0 and 1 (e.g. 0.3), got {holdout!r}")
        if not _whole(seed):
            raise RequestSpecError(f"split seed must be a whole number, got {seed!r}")
        object.__setattr__(self, "holdout", float(holdout))
        object.__setattr__(self, "seed", int(seed))

    def to_wire(self) -> dict[str, Any]:
        """The split as the airlock service takes it."""
        return {"holdout": self.holdout, "seed": self.seed}


@dataclass(frozen=True)
class TrainRows:
    """The positions of the training rows in the dataset as ``data.load`` returns it."""

    rows: Sequence[int]
    """Row positions (0, 1, ...); stored as a tuple of ints."""

    def __post_init__(self) -> None:
        rows: object = self.rows
        tolist = getattr(rows, "tolist", None)  # a numpy array of positions, as split_indices returns them
        if callable(tolist):
            rows = tolist()
        if not isinstance(rows, list | tuple):
            raise RequestSpecError(f"train_rows must be a list of row positions, got {type(self.rows).__name__}")
        if not all(_whole(r) and int(r) >= 0 for r in rows):
            raise RequestSpecError("train_rows must be row positions: whole numbers >= 0")
        if not rows:
            raise RequestSpecError("train_rows is empty; list the rows the model was trained on")
        object.__setattr__(self, "rows", tuple(int(r) for r in rows))

    def to_wire(self) -> dict[str, Any]:
        """The split as the airlock service takes it."""
        return {"train_rows": list(self.rows)}


Split = HoldoutSplit | TrainRows
"""How the training rows are declared for the membership-inference audit."""


def _source_of(model: type) -> str:
    try:
        return class_source(model)
    except SourceNotFound as e:
        raise RequestSpecError(f"{e}; pass model_source as a string") from None


def split_from(value: Split | Mapping[str, Any]) -> Split:
    """A split from ``{"holdout": 0.3, "seed": 0}`` or ``{"train_rows": [...]}`` (or one already made)."""
    if isinstance(value, HoldoutSplit | TrainRows):
        return value
    if isinstance(value, Mapping):
        if set(value) == {"train_rows"}:
            return TrainRows(value["train_rows"])
        if "holdout" in value and set(value) <= {"holdout", "seed"}:
            return HoldoutSplit(**value)
    raise RequestSpecError(
        f'declare the split as {{"holdout": 0.3, "seed": 0}} or {{"train_rows": [...]}}, got {value!r}'
    )


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The model behind a weights file, for the membership-inference audit the airlock runs on it."""

    source: str
    """Python source that defines the model class (:meth:`from_class` takes it from the class)."""
    target: str
    """The dataset's column the model predicts."""
    split: Split
    """Which rows trained the model (the others are the audit's non-members)."""
    class_name: str = "Model"
    """The class in ``source`` to instantiate."""
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments of the class (JSON values): ``Model(**kwargs)``."""
    features: Sequence[str] | None = None
    """The input columns, in order; None: every column but the target."""
    loss: Loss = "cross_entropy"
    """``cross_entropy``, ``bce`` or ``mse``."""
    preprocess: Preprocess = "none"
    """``none`` or ``standardize``."""
    dataset: str | None = None
    """The training dataset when no training record names it."""

    def __post_init__(self) -> None:
        if not _name(self.source):
            raise RequestSpecError("model_source must be the model class, or its Python source as a string")
        if len(self.source) > MAX_MODEL_SOURCE:
            raise RequestSpecError(f"the model source is longer than {MAX_MODEL_SOURCE} characters")
        class_name: object = self.class_name
        if not (isinstance(class_name, str) and class_name.isidentifier()):
            raise RequestSpecError(f"model_class must be the name of a class, got {self.class_name!r}")
        if not _name(self.target):
            raise RequestSpecError(
                f"target= must name the column the model predicts (the audit computes its loss), got {self.target!r}"
            )
        kwargs: object = self.kwargs
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
            raise RequestSpecError(f"model_kwargs must be a dict of keyword arguments, got {kwargs!r}")
        try:
            json.dumps(dict(kwargs), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise RequestSpecError(
                f"model_kwargs must hold JSON values (numbers, strings, lists, dicts): {e}"
            ) from None
        object.__setattr__(self, "kwargs", dict(kwargs))
        if self.features is not None:
            features = _names(self.features)
            if features is None or isinstance(self.features, str) or not features:
                raise RequestSpecError(f"features must be a list of column names, got {self.features!r}")
            object.__setattr__(self, "features", features)
        if self.loss not in LOSSES:
            raise RequestSpecError(f"loss must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        if self.preprocess not in PREPROCESSING:
            raise RequestSpecError(f"preprocess must be one of {', '.join(PREPROCESSING)}; got {self.preprocess!r}")
        split: object = self.split
        if isinstance(split, Mapping):
            split = split_from(split)
        if not isinstance(split, HoldoutSplit | TrainRows):
            raise RequestSpecError(
                "split= must declare the training rows: HoldoutSplit(holdout=0.3, seed=0) or TrainRows([...])"
            )
        object.__setattr__(self, "split", split)
        if self.dataset is not None and not _name(self.dataset):
            raise RequestSpecError(f"dataset must be a dataset's name, got {self.dataset!r}")

    @classmethod
    def from_class(
        cls,
        model: type,
        *,
        target: str,
        split: Split,
        class_name: str | None = None,
        kwargs: Mapping[str, Any] | None = None,
        features: Sequence[str] | None = None,
        loss: Loss = "cross_entropy",
        preprocess: Preprocess = "none",
        dataset: str | None = None,
    ) -> ModelSpec:
        """A spec whose source is the module (or notebook cell) that defines ``model``; the rest as above."""
        return cls(
            source=_source_of(model),
            class_name=class_name or model.__name__,
            target=target,
            split=split,
            kwargs=kwargs or {},
            features=features,
            loss=loss,
            preprocess=preprocess,
            dataset=dataset,
        )

    def to_wire(self) -> dict[str, Any]:
        """The model description as the airlock service takes it."""
        out: dict[str, Any] = {
            "source": self.source,
            "class": self.class_name,
            "kwargs": dict(self.kwargs),
            "target": self.target,
            "features": None if self.features is None else list(self.features),
            "loss": self.loss,
            "split": self.split.to_wire(),
            "preprocess": self.preprocess,
        }
        if self.dataset is not None:
            out["dataset"] = self.dataset
        return out


@dataclass(frozen=True, kw_only=True)
class RequestSpec:
    """One request to the airlock: what the file is, why it should leave, and what the checks need."""

    kind: Kind
    """``table``, ``figure``, ``weights`` or ``other``."""
    justification: str
    """Why the output must leave the workspace (the steward reads it)."""
    project: str | None = None
    """The project it belongs to; None when you are a member of one project only."""
    recipe: TableRecipe | None = None
    """For a table: how it was computed, so each cell can be checked."""
    model: ModelSpec | None = None
    """For weights: the model, for the membership-inference audit."""
    supersedes: str | None = None
    """The id of an earlier request of yours this one replaces."""
    format: TableFormat | None = None
    """For a table: what it is released as, ``csv`` (the default) or ``xlsx``; either is re-written by the airlock
    from the table's parsed cells."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise RequestSpecError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if not _name(self.justification):
            raise RequestSpecError("say why this output should leave the workspace: justification='...'")
        if len(self.justification) > MAX_JUSTIFICATION:
            raise RequestSpecError(f"the justification is longer than {MAX_JUSTIFICATION} characters")
        if self.project is not None and not _name(self.project):
            raise RequestSpecError(f"project must be a project's name, or be left out, got {self.project!r}")
        recipe: object = self.recipe
        if recipe is not None and self.kind != "table":
            raise RequestSpecError(f"a recipe (dict) goes with kind='table' only; this request is kind={self.kind!r}")
        if isinstance(recipe, Mapping):
            object.__setattr__(self, "recipe", TableRecipe.from_dict(recipe))
        elif recipe is not None and not isinstance(recipe, TableRecipe):
            raise RequestSpecError(f"recipe must be a TableRecipe or a dict, got {type(recipe).__name__}")
        model: object = self.model
        if model is not None and self.kind != "weights":
            raise RequestSpecError(
                f"a model (model_source=...) goes with kind='weights' only; this request is kind={self.kind!r}"
            )
        if model is not None and not isinstance(model, ModelSpec):
            raise RequestSpecError(f"model must be a ModelSpec, got {type(model).__name__}")
        if self.supersedes is not None and not _name(self.supersedes):
            raise RequestSpecError(f"supersedes must be the id of an earlier request, got {self.supersedes!r}")
        if self.format is not None:
            if self.format not in TABLE_FORMATS:
                raise RequestSpecError(f"format must be one of {', '.join(TABLE_FORMATS)}; got {self.format!r}")
            if self.kind != "table":
                raise RequestSpecError(f"format= goes with kind='table' only; this request is kind={self.kind!r}")

    def to_wire(self, filename: str) -> dict[str, Any]:
        """The arguments of the service's ``request`` operation for the file ``filename``."""
        args: dict[str, Any] = {"kind": self.kind, "justification": self.justification, "filename": filename}
        if self.project is not None:
            args["project"] = self.project
        if self.recipe is not None:
            args["recipe"] = self.recipe.to_wire()
        if self.supersedes is not None:
            args["supersedes"] = self.supersedes
        if self.model is not None:
            args["model"] = self.model.to_wire()
        if self.format is not None:
            args["format"] = self.format
        return args


class RequestOptions(TypedDict, total=False):
    """The optional keyword arguments of ``airlock.request`` and :func:`request_spec` (see there)."""

    project: str | None
    model_source: str | type | None
    model_class: str | None
    model_kwargs: Mapping[str, Any] | None
    target: str | None
    features: Sequence[str] | None
    loss: Loss
    split: Split | Mapping[str, Any] | None
    preprocess: Preprocess
    dataset: str | None
    recipe: TableRecipe | Mapping[str, Any] | None
    supersedes: str | None
    format: TableFormat | None


OPTIONS = tuple(RequestOptions.__annotations__)
"""The names of the optional keyword arguments, in their documented order."""


def request_spec(*, kind: Kind, justification: str, **options: Unpack[RequestOptions]) -> RequestSpec:
    """The :class:`RequestSpec` of ``airlock.request``'s keyword arguments (see there)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise RequestSpecError(
            f"unknown keyword argument(s) {', '.join(unknown)}; "
            f"a request takes kind, justification, {', '.join(OPTIONS)}"
        )
    if kind not in KINDS:
        raise RequestSpecError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    project = options.get("project")
    model_source = options.get("model_source")
    model_class = options.get("model_class")
    model_kwargs = options.get("model_kwargs")
    target = options.get("target")
    features = options.get("features")
    loss: Loss = options.get("loss", "cross_entropy")
    split = options.get("split")
    preprocess: Preprocess = options.get("preprocess", "none")
    dataset = options.get("dataset")
    recipe = options.get("recipe")
    supersedes = options.get("supersedes")
    if recipe is not None and kind != "table":
        raise RequestSpecError(f"a recipe (dict) goes with kind='table' only; this request is kind={kind!r}")
    model: ModelSpec | None = None
    described = {
        "model_class": model_class,
        "model_kwargs": model_kwargs,
        "target": target,
        "features": features,
        "split": split,
        "dataset": dataset,
    }
    if model_source is None:
        given = [k for k, v in described.items() if v is not None]
        given += [
            k for k, v, default in (("loss", loss, "cross_entropy"), ("preprocess", preprocess, "none")) if v != default
        ]
        if given:
            raise RequestSpecError(
                f"{', '.join(given)}: these describe the model for the audit; give model_source= too (the model class)"
            )
    else:
        if kind != "weights":
            raise RequestSpecError(f"model_source= goes with kind='weights' only; this request is kind={kind!r}")
        if split is None:
            raise RequestSpecError(
                'split= must declare the training rows: {"holdout": 0.3, "seed": 0} or {"train_rows": [...]}'
            )
        if target is None:
            raise RequestSpecError(
                "target= must name the column the model predicts (the audit computes its loss), got None"
            )
        if isinstance(model_source, type):
            source, class_name = _source_of(model_source), model_class or model_source.__name__
        else:
            source, class_name = model_source, model_class or "Model"
        model = ModelSpec(
            source=source,
            class_name=class_name,
            target=target,
            split=split_from(split),
            kwargs=model_kwargs or {},
            features=features,
            loss=loss,
            preprocess=preprocess,
            dataset=dataset,
        )
    table = recipe if recipe is None or isinstance(recipe, TableRecipe) else TableRecipe.from_dict(recipe)
    return RequestSpec(
        kind=kind,
        justification=justification,
        project=project,
        recipe=table,
        model=model,
        supersedes=supersedes,
        format=options.get("format"),
    )


__all__ = [
    "KINDS",
    "HoldoutSplit",
    "Kind",
    "Loss",
    "ModelSpec",
    "Preprocess",
    "RequestSpec",
    "OPTIONS",
    "RequestOptions",
    "RequestSpecError",
    "Split",
    "TABLE_FORMATS",
    "TableFormat",
    "TableRecipe",
    "TrainRows",
    "request_spec",
    "split_from",
]
