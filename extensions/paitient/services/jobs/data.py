"""The rows a job trains and is audited on: its dataset version's columns, preprocessed as declared, split.

The runner reads the dataset's current version itself (root, from the data root), keeps the features and
the target, applies the job's declarative preprocessing (:mod:`paitient.rules.jobspec`) and splits the rows
into a training part and a held-out part with a seed it draws and records. Training never sees the
held-out rows; the test metrics and the membership-inference audit are computed on them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from paitient.rules import catalogue
from paitient.rules.jobspec import SpecError, canonical_preprocessing
from paitient.services.data.publish import MANIFEST_FILE

CLASSIFICATION = ("cross_entropy", "bce_with_logits", "smooth_hinge")


@dataclass(frozen=True)
class Prepared:
    x_train: np.ndarray
    y_train: np.ndarray
    x_holdout: np.ndarray
    y_holdout: np.ndarray
    features: list[str]
    """The model's input columns, after one-hot expansion."""
    classes: int
    """Distinct target values (classification), 0 for regression."""
    dataset_sha256: str
    split_seed: int
    preprocessing: list[dict[str, Any]] = field(default_factory=list)
    """The steps applied, constants taken from the catalogue filled in: what the signed record states."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_features(frame: pd.DataFrame, target: str) -> list[str]:
    """Every numeric column but the target (booleans count as numbers)."""
    return [c for c in frame.columns if c != target and pd.api.types.is_numeric_dtype(frame[c])]


def prepare(data_file: Path, spec: dict[str, Any], split_seed: int) -> Prepared:
    """Read ``data_file`` (a dataset version's Parquet) and make the job's arrays; :class:`SpecError` says
    what in the request does not fit the data."""
    frame = pq.read_table(data_file).to_pandas()
    columns = [str(c) for c in frame.columns]
    steps = canonical_preprocessing(_resolved(spec["preprocessing"], data_file), columns)
    target = spec["target"]
    if target not in frame.columns:
        raise SpecError(f"the dataset has no column {target!r}; its columns: {', '.join(map(str, frame.columns))}")
    onehot = {s["column"]: s for s in steps if s["op"] == "onehot"}
    features = spec["features"] or [*default_features(frame, target), *[c for c in onehot if c != target]]
    missing = [c for c in features if c not in frame.columns]
    if missing:
        raise SpecError(f"the dataset has no column(s) {', '.join(missing)}")
    # In the dataset's order, whatever order they were named in: the record states them, and an order of the
    # researcher's choosing would be bits of theirs in it (a one-hot's columns come after, as it expands them).
    features = sorted(dict.fromkeys(features), key=columns.index)  # a one-hot of a default feature: once
    _check_kinds(frame, features, steps, target, spec["loss"])
    x = frame[features].copy()
    for step in steps:
        x = _apply(x, step, features)
    bad = [c for c in x.columns if not pd.api.types.is_numeric_dtype(x[c])]
    if bad:
        raise SpecError(f"feature(s) {', '.join(map(str, bad))} are not numbers; one-hot encode them (onehot step)")
    values = x.to_numpy(dtype=np.float64)
    holes = [str(c) for c, n in zip(x.columns, np.isnan(values).sum(axis=0), strict=True) if n]
    if holes:
        raise SpecError(f"feature(s) {', '.join(holes)} have missing values; add a fill step for them")
    y_raw = frame[target]
    if y_raw.isna().any():
        raise SpecError(f"the target {target!r} has missing values in {int(y_raw.isna().sum())} rows")
    if spec["loss"] in CLASSIFICATION:
        labels = np.sort(y_raw.unique())
        if spec["loss"] in ("bce_with_logits", "smooth_hinge") and len(labels) != 2:
            fewer = "fewer" if len(labels) < 2 else "more"
            raise SpecError(f"{spec['loss']} needs a target with 2 values; {target!r} has {fewer}")
        y = np.searchsorted(labels, y_raw.to_numpy()).astype(np.int64)
        classes = len(labels)
    else:
        y, classes = y_raw.to_numpy(dtype=np.float64), 0
    order = np.random.default_rng(split_seed).permutation(len(frame))
    n_holdout = max(1, round(len(frame) * spec["holdout"]))
    if len(frame) - n_holdout < 2:
        raise SpecError(f"the dataset has {len(frame)} rows: too few to train on and hold some out")
    hold, train = order[:n_holdout], order[n_holdout:]
    return Prepared(
        x_train=values[train].astype(np.float32),
        y_train=y[train],
        x_holdout=values[hold].astype(np.float32),
        y_holdout=y[hold],
        features=[str(c) for c in x.columns],
        classes=classes,
        dataset_sha256=sha256_file(data_file),
        split_seed=split_seed,
        preprocessing=steps,
    )


def _kind(series: pd.Series) -> str | None:
    """What a column holds when it is not numbers (``text``, ``dates``, ...), None when it is numbers (booleans
    count). Read from its dtype alone: a message naming it quotes no value."""
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_numeric_dtype(dtype):
        return None
    if pd.api.types.is_datetime64_any_dtype(dtype) or pd.api.types.is_timedelta64_dtype(dtype):
        return "dates or times"
    if isinstance(dtype, pd.CategoricalDtype):
        return "categories"
    return "text"


def _check_kinds(frame: pd.DataFrame, features: list[str], steps: list[dict[str, Any]], target: str, loss: str) -> None:
    """Refuse, naming the column and what to do, a column that is not numbers where numbers are needed: a
    feature not one-hot encoded, a fill or standardise step's column, a regression target. Checked before any
    conversion: pandas' and numpy's own errors quote the value they could not convert (a row's pseudonym,
    a note), and a job's reason is read by its owner and kept in the audit trail."""
    encoded = {s["column"] for s in steps if s["op"] == "onehot"}
    for step in steps:
        if step["op"] in ("fill", "standardise"):
            for column in step["columns"]:
                kind = _kind(frame[column]) if column in frame.columns else None
                if kind:
                    raise SpecError(
                        f"{step['op']} names column {column!r}, which holds {kind}, not numbers: one-hot encode it "
                        "(an onehot step) or leave it out of the features"
                    )
    for column in features:
        kind = None if column in encoded else _kind(frame[column])
        if kind:
            raise SpecError(
                f"feature {column!r} holds {kind}, not numbers: one-hot encode it (an onehot step) or leave it out "
                "of the features"
            )
    kind = _kind(frame[target])
    if kind and loss not in CLASSIFICATION:
        raise SpecError(
            f"the target {target!r} holds {kind}, not numbers: {loss} needs a numeric target; choose another target, "
            "or cross_entropy to predict it as classes"
        )


def _resolved(steps: list[dict[str, Any]], data_file: Path) -> list[dict[str, Any]]:
    """The job's steps with the constants of those that take them from the catalogue, and a onehot step's own
    categories checked against it: the manifest published beside ``data_file`` (root's, never the kernel's)."""
    if not any(s.get("from") == "catalogue" or s["op"] == "onehot" for s in steps):
        return [dict(s) for s in steps]
    where = f"{data_file.parent.parent.parent.name} version {data_file.parent.name}"
    try:
        manifest = json.loads((data_file.parent / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    statistics = {str(c["name"]): c for c in manifest.get("columns", []) if isinstance(c, dict) and "name" in c}
    try:
        return [catalogue.resolve_step(s, statistics, where) for s in steps]
    except catalogue.CatalogueMissing as e:
        raise SpecError(str(e)) from None


def _apply(x: pd.DataFrame, step: dict[str, Any], features: list[str]) -> pd.DataFrame:
    op = step["op"]
    if op == "onehot":
        column = step["column"]
        if column not in x.columns:
            raise SpecError(f"onehot column {column!r} is not among the features")
        values = x.pop(column)
        for category in step["categories"]:
            x[f"{column}={category}"] = (values == category).astype(np.float64)
        return x
    absent = [c for c in step["columns"] if c not in x.columns]
    if absent:
        raise SpecError(f"{op} names column(s) {', '.join(absent)}, which are not among the features")
    if op == "fill":
        x[step["columns"]] = x[step["columns"]].astype(np.float64).fillna(step["value"])
    else:  # standardise
        cols = step["columns"]
        x[cols] = (x[cols].astype(np.float64) - np.array(step["mean"])) / np.array(step["std"])
    return x
