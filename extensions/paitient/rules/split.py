"""The train/holdout split a weights request declares, as one pure function both sides use.

The membership-inference audit needs to know which rows trained the model (members) and which did not
(non-members). A request declares it in one of two ways:

- ``{"holdout": 0.3, "seed": 0}``: the rows :func:`split_indices` gives for the dataset's row count. Train
  with ``train, holdout = paitient.kernel.airlock.split_indices(len(df), holdout=0.3, seed=0)`` and declare the same
  numbers;
- ``{"train_rows": [0, 5, 7, ...]}``: the positions of the training rows, explicitly.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class SplitError(ValueError):
    """The declared split is unusable; the message says what to declare."""


def split_indices(n_rows: int, *, holdout: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row positions ``(train, holdout)`` of a reproducible random split of ``n_rows`` rows."""
    if not 0 < holdout < 1:
        raise SplitError(f"holdout must be a fraction between 0 and 1, got {holdout}")
    perm = np.random.default_rng(seed).permutation(n_rows)
    n_hold = int(round(n_rows * holdout))
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def members_from_spec(spec: Any, n_rows: int) -> np.ndarray:
    """Boolean mask of the training rows declared by ``spec`` for a dataset of ``n_rows`` rows."""
    if not isinstance(spec, dict):
        raise SplitError('declare the split as {"holdout": 0.3, "seed": 0} or {"train_rows": [...]}')
    mask = np.zeros(n_rows, dtype=bool)
    if "train_rows" in spec:
        rows = spec["train_rows"]
        if not isinstance(rows, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in rows):
            raise SplitError("train_rows must be a list of row positions (integers)")
        if rows and (min(rows) < 0 or max(rows) >= n_rows):
            raise SplitError(f"train_rows must lie between 0 and {n_rows - 1} (the dataset has {n_rows} rows)")
        mask[rows] = True
    elif "holdout" in spec:
        holdout, seed = spec.get("holdout"), spec.get("seed", 0)
        if not isinstance(holdout, int | float) or not isinstance(seed, int):
            raise SplitError("holdout must be a number and seed an integer")
        train, _ = split_indices(n_rows, holdout=float(holdout), seed=seed)
        mask[train] = True
    else:
        raise SplitError('declare the split as {"holdout": 0.3, "seed": 0} or {"train_rows": [...]}')
    if mask.all() or not mask.any():
        raise SplitError("the audit needs both training rows and held-out rows; hold some rows out of training")
    return mask
