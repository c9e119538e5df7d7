"""Check a model before private training and explain each problem with the fix; never change the model.

Opacus' validator finds the layers DP-SGD cannot train (per-sample gradients need every sample's
output to depend on that sample alone). Its automatic fix is deliberately not used: it turns
``BatchNorm1d(C)`` into ``GroupNorm(C, C)``, which on tabular input of shape (N, C) normalises each
single feature on its own and outputs the bias alone, a silently dead layer. Here each problem names
the layer and the replacement to write, with group counts that keep more than one channel per group.
"""

from __future__ import annotations

import torch
from opacus.validators import ModuleValidator
from torch import nn

BatchNorm = nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d | nn.SyncBatchNorm
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class DPModelError(ValueError):
    """The model cannot be trained privately as it is; the message lists each problem and its fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = [f"  {i}. {p}" for i, p in enumerate(problems, 1)]
        super().__init__(
            "this model cannot be trained with differential privacy as it is:\n"
            + "\n".join(lines)
            + "\nChange the model definition and call make_private again (paitient does not rewrite models)."
        )


def group_count(channels: int) -> int | None:
    """Groups for a GroupNorm over ``channels``: the largest of 32, 16, 8, 4, 2 leaving >= 2 channels each."""
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0 and channels // g >= 2:
            return g
    return None


def batchnorm_fix(name: str, module: BatchNorm) -> str:
    """The problem with one BatchNorm layer, and the layer to write instead."""
    c = module.num_features
    groups = group_count(c)
    where = f"layer '{name}' ({type(module).__name__}({c}))"
    why = (
        "BatchNorm normalises each sample with statistics of the whole batch, so one patient's "
        "gradient depends on the others' and cannot be clipped per patient"
    )
    if isinstance(module, nn.BatchNorm1d):
        fix = f"replace it with nn.LayerNorm({c})"
        if groups:
            fix += f" or nn.GroupNorm({groups}, {c})"
        fix += (
            f" (not GroupNorm({c}, {c}): on tabular input of shape (N, {c}) each group holds one value "
            "and the layer outputs its bias alone)"
        )
    else:
        fix = f"replace it with nn.GroupNorm({groups or 1}, {c})"
    return f"{where}: {why}; {fix}."


def problems(model: nn.Module) -> list[str]:
    """Every reason ``model`` cannot be trained privately, each with the fix; empty when it can."""
    out: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, _BATCHNORM):
            out.append(batchnorm_fix(name or type(model).__name__, module))
    seen_batchnorm = bool(out)
    for err in ModuleValidator.validate(model, strict=False):
        text = str(err)
        if seen_batchnorm and text.startswith("BatchNorm cannot support"):
            continue
        if "nn.LSTM" in text or "nn.GRU" in text or "nn.RNN" in text:
            text = (
                "recurrent layers from torch.nn keep their weights in fused kernels; use "
                "opacus.layers.DPLSTM / DPGRU / DPRNN, which take the same arguments"
            )
        out.append(text.strip())
    if not any(p.requires_grad for p in model.parameters()):
        out.append("the model has no trainable parameters (all have requires_grad=False)")
    return out


def check_model(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Raise :class:`DPModelError` listing all problems (model layers, and optimizer/model mismatch)."""
    found = problems(model)
    if optimizer is not None:
        params = {id(p) for p in model.parameters()}
        stray = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in params)
        if stray:
            found.append(
                f"the optimizer holds {stray} parameter(s) that are not the model's; make the "
                "optimizer from model.parameters()"
            )
    if found:
        raise DPModelError(found)
