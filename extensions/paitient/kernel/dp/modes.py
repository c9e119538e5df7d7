"""Which way to compute clipped per-sample gradients, and why: pure functions over the model."""

from __future__ import annotations

import torch
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleModuleFastGradientClipping as _Ghost,
)
from torch import nn

from paitient.kernel.dp.fast import linear_layers
from paitient.kernel.dp.options import MODES, ChosenMode, Mode
from paitient.kernel.dp.validate import DPModelError

__all__ = ["MODES", "ChosenMode", "Mode", "choose_mode", "trainable_layer_types"]


def trainable_layer_types(model: nn.Module) -> list[tuple[str, type[nn.Module]]]:
    """``(name, type)`` of each layer that has trainable parameters of its own."""
    return [
        (name or type(model).__name__, type(m))
        for name, m in model.named_modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def choose_mode(
    model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module | None, requested: Mode = "auto"
) -> tuple[ChosenMode, str, list[tuple[str, nn.Module]]]:
    """``(mode, reason, layers for the fast path)`` for ``requested``, one of :data:`MODES`."""
    if requested not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {requested!r}")
    params = {p for g in optimizer.param_groups for p in g["params"]}
    layers, why_not_fast = linear_layers(model, params)
    if requested == "fast":
        if not layers:
            raise DPModelError(
                [
                    f"mode='fast' needs every trainable layer to be nn.Linear or a normalisation "
                    f"layer: {why_not_fast}; use mode='auto'"
                ]
            )
        return "fast", "asked for", layers
    if requested == "ghost":
        if criterion is None:
            raise DPModelError(["mode='ghost' needs the loss: pass criterion=... (e.g. nn.CrossEntropyLoss())"])
        return "ghost", "asked for", []
    if requested == "hooks":
        return "hooks", "asked for", []
    if layers:
        return (
            "fast",
            ("every trainable layer is nn.Linear or a normalisation layer, so paitient's fast clipping applies"),
            layers,
        )
    odd = sorted({t.__name__ for _, t in trainable_layer_types(model) if t not in _Ghost.NORM_SAMPLERS})
    if not odd and criterion is not None:
        return "ghost", f"{why_not_fast}; every trainable layer supports Opacus' ghost clipping", []
    if not odd:
        return "hooks", ("ghost clipping would fit but needs the loss: pass criterion=... to make_private for it"), []
    return (
        "hooks",
        (
            f"{why_not_fast}; ghost clipping does not cover {', '.join(odd)}, so Opacus' "
            "per-sample gradients (hooks) are used"
        ),
        [],
    )
