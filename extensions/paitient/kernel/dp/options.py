"""What a private training run is asked to do: :class:`RunOptions`, checked when it is made.

:func:`paitient.kernel.dp.make_private` turns its keyword arguments into a :class:`RunOptions`, so a
mistake is reported before the model is looked at or any budget is reserved. The fields have the
names of those arguments, so a run can be repeated or varied::

    opts = dp.RunOptions(target_epsilon=1.0, epochs=5, max_grad_norm=1.0)
    run = dp.make_private(model, optimizer, loader, **dataclasses.asdict(opts))
    run2 = dp.make_private(model2, optimizer2, loader, **dataclasses.asdict(dataclasses.replace(opts, epochs=10)))
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal, get_args

Mode = Literal["auto", "fast", "ghost", "hooks"]
"""How clipped per-sample gradients are computed: ``auto`` picks the fastest correct one of the others
(:func:`paitient.kernel.dp.modes.choose_mode`);
``fast``: paitient's clipping for models of Linear and normalisation layers (no per-sample gradients
for the Linear ones, one backward pass);
``ghost``: Opacus' ghost clipping (norms without per-sample gradients where a layer allows, two backward
passes); ``hooks``: Opacus' per-sample gradients from hooks (every supported layer, slowest)."""

ChosenMode = Literal["fast", "ghost", "hooks"]
"""The mode a run trains in (``auto`` resolved)."""

LossReduction = Literal["mean", "sum"]
"""How the loss combines the samples of a batch: their mean (torch's default) or their sum."""

MODES: tuple[Mode, ...] = get_args(Mode)
LOSS_REDUCTIONS: tuple[LossReduction, ...] = get_args(LossReduction)


class OptionsError(ValueError):
    """Options a private run cannot take; the message names each option, its value and what is allowed."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """The options of one private training run (the keyword arguments of ``make_private``).

    Made only valid: each field is checked when the object is made and :class:`OptionsError` lists
    every problem. Numbers of numpy's types are stored as plain ``float`` and ``int``.
    """

    target_epsilon: float
    """The most privacy loss (epsilon) the run may spend; reserved in the ledger before training."""
    epochs: int
    """Passes over the data loader the run plans, and the budget covers (a whole number >= 1)."""
    max_grad_norm: float
    """The bound C each sample's gradient is clipped to (e.g. 1.0)."""
    target_delta: float | None = None
    """Delta, in (0, 1); ``None``: :func:`paitient.rules.budget.default_delta` of the dataset."""
    project: str | None = None
    """The project charged; ``None`` when you are a member of one project only."""
    dataset: str | None = None
    """The dataset trained on; ``None`` when the project has one dataset only."""
    mode: Mode = "auto"
    """``auto``, ``fast``, ``ghost`` or ``hooks`` (see docs/privacy.md)."""
    loss_reduction: LossReduction = "mean"
    """``mean`` or ``sum``: how the criterion combines a batch's losses."""
    progress: bool = True
    """Show a progress bar with the epsilon spent, and print the run's plan."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        set_ = object.__setattr__  # the dataclass is frozen: normalised values are written once, here

        eps = _number(self.target_epsilon)
        if eps is None or eps <= 0:
            problems.append(f"target_epsilon must be a positive number (e.g. 1.0), got {self.target_epsilon!r}")
        else:
            set_(self, "target_epsilon", eps)
        epochs = self.epochs
        if isinstance(epochs, numbers.Integral) and not isinstance(epochs, bool) and epochs >= 1:
            set_(self, "epochs", int(epochs))
        else:
            problems.append(f"epochs must be a whole number >= 1, got {epochs!r}")
        norm = _number(self.max_grad_norm)
        if norm is None or norm <= 0:
            problems.append(f"max_grad_norm must be a positive number (e.g. 1.0), got {self.max_grad_norm!r}")
        else:
            set_(self, "max_grad_norm", norm)
        if self.target_delta is not None:
            delta = _number(self.target_delta)
            if delta is None or not 0 < delta < 1:
                problems.append(
                    f"target_delta must lie between 0 and 1 (e.g. 1e-6), or be left out for the dataset's "
                    f"default, got {self.target_delta!r}"
                )
            else:
                set_(self, "target_delta", delta)
        for name in ("project", "dataset"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                problems.append(f"{name} must be a {name}'s name, or be left out when you have one, got {value!r}")
        if self.mode not in MODES:
            problems.append(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            problems.append(f"loss_reduction must be 'mean' or 'sum', got {self.loss_reduction!r}")
        if not isinstance(self.progress, bool):
            problems.append(f"progress must be True or False, got {self.progress!r}")
        if problems:
            raise OptionsError(problems)


def _number(value: object) -> float | None:
    """``value`` as a finite float when it is a real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    out = float(value)
    return out if math.isfinite(out) else None
