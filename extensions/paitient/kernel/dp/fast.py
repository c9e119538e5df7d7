"""paitient's fast DP-SGD for models whose trainable layers are all ``nn.Linear`` ("book-keeping").

Opacus materialises one gradient per sample (hooks) or runs a second backward pass (ghost clipping).
For a linear layer neither is needed. With activations ``a`` (B x in) and backprops ``g`` (B x out),
sample i's weight gradient is the outer product ``g_i a_i^T``, so

- its norm is ``|g_i| * |a_i|``,
- the sum of the clipped per-sample gradients is one matrix product: ``(c * g)^T a``.

For 3-D inputs (B x T x d) each sample's gradient ``g_i^T a_i`` is materialised and clipped from those
numbers (a norm computed without it can cancel to zero: :mod:`paitient.rules.clipping`).

So the backward pass here computes only the gradients of the layer inputs (the weight gradients of
plain autograd are skipped), keeps ``a`` and ``g``, and the optimizer step computes the clip factors
``c_i = min(1, C / (|grad_i| + 1e-6))`` from the norms of all layers together, then writes
``(sum_i c_i grad_i + N(0, (sigma C)^2)) / E`` into ``p.grad`` with one fused ``addmm`` per layer,
exactly what Opacus' DPOptimizer computes (same clip formula, same mean-loss scaling by the batch
size, same division by the expected batch size ``E``).
The capture, the norms and the clipped sum are :mod:`paitient.rules.clipping`'s, which the jobs
runner clips with too.

Normalisation layers beside the Linear ones (LayerNorm, GroupNorm, InstanceNorm, RMSNorm: few
parameters each) are handled the Opacus way inside the same step: their inputs and backprops are
captured and Opacus' per-sample gradient function for the layer type gives their per-sample gradients,
whose norms join the Linear layers' in the clip factor.
"""

from __future__ import annotations

import math
import types
from collections import defaultdict
from collections.abc import Callable
from typing import Any, overload

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from torch import nn
from torch.utils.hooks import RemovableHandle

from paitient.kernel.dp.options import LossReduction
from paitient.rules.clipping import (
    add_clipped,
    add_clipped_linear,
    capture_linear,
    linear_sample_grads,
    linear_sample_norms,
)

PER_SAMPLE_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.RMSNorm)
"""Layers the fast path takes per-sample gradients of (from Opacus' grad samplers): small ones only."""


class FastPathError(RuntimeError):
    """The model did something the fast path cannot clip correctly; the message says what to do."""


class _LinearSlot:
    """A Linear layer and, per backward pass, its (input, backprop of its output)."""

    __slots__ = ("name", "module", "pairs", "last_pass")

    def __init__(self, name: str, module: nn.Linear):
        self.name = name
        self.module = module
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.last_pass = -1


class _NormSlot:
    """A normalisation layer and, per backward pass, (its forward's inputs, backprop of its output), as
    Opacus' grad samplers take them."""

    __slots__ = ("name", "module", "pairs", "last_pass")

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module
        self.pairs: list[tuple[list[object], torch.Tensor]] = []
        self.last_pass = -1


_Slot = _LinearSlot | _NormSlot


def linear_layers(model: nn.Module, params: set[torch.Tensor]) -> tuple[list[tuple[str, nn.Module]], str]:
    """The layers the fast path clips (Linear, and :data:`PER_SAMPLE_TYPES`), or ``([], reason)``."""
    layers: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        label = name or type(model).__name__
        if type(module) is not nn.Linear and type(module) not in PER_SAMPLE_TYPES:
            return [], (f"layer '{label}' ({type(module).__name__}) is neither nn.Linear nor a normalisation layer")
        if len(own) != len(list(module.parameters(recurse=False))) or any(p not in params for p in own):
            return [], f"layer '{label}' is partly frozen or not fully in the optimizer"
        layers.append((name, module))
    if not layers:
        return [], "the model has no trainable parameters"
    return layers, ""


class FastClipper:
    """Installs the capturing forward on each Linear layer and turns captures into private gradients."""

    def __init__(self, model: nn.Module, layers: list[tuple[str, nn.Module]]):
        self.model = model
        self.slots: list[_Slot] = [
            _LinearSlot(name or type(model).__name__, m)
            if type(m) is nn.Linear
            else _NormSlot(name or type(model).__name__, m)
            for name, m in layers
        ]
        self.pass_id = 0
        self.params: list[torch.Tensor] = [p for _, m in layers for p in m.parameters(recurse=False)]
        self.sizes = [p.numel() for p in self.params]
        self.numel = sum(self.sizes)
        proto = self.params[0].detach()
        self._one = torch.ones((), dtype=proto.dtype, device=proto.device)
        # one buffer for all gradients, refilled with fresh noise each step; its views become the .grad
        self._flat = torch.empty(self.numel, dtype=proto.dtype, device=proto.device)
        self._views = [c.view(p.shape) for p, c in zip(self.params, torch.split(self._flat, self.sizes), strict=True)]
        self._hook = model.register_forward_pre_hook(self._next_pass)
        self._layer_hooks: list[RemovableHandle] = []
        for slot in self.slots:
            if isinstance(slot, _LinearSlot):
                # an instance attribute in front of the class's forward; detach() removes it
                slot.module.__dict__["forward"] = types.MethodType(_make_forward(self, slot), slot.module)
            else:
                self._layer_hooks.append(slot.module.register_forward_hook(_make_capture(self, slot)))

    def _next_pass(self, module: nn.Module, args: tuple[object, ...]) -> None:
        self.pass_id += 1

    def detach(self) -> None:
        """Give the model back its plain forward."""
        self._hook.remove()
        for hook in self._layer_hooks:
            hook.remove()
        for slot in self.slots:
            slot.module.__dict__.pop("forward", None)
            slot.pairs.clear()

    def clear(self) -> None:
        """Drop what the layers captured (a new step starts)."""
        for slot in self.slots:
            slot.pairs.clear()
        self.pass_id += 1

    @torch.no_grad()
    def private_grads(
        self,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        loss_reduction: str,
        generator: torch.Generator | None = None,
    ) -> int:
        """Write the clipped, noised, scaled gradient into every layer's ``.grad``; return the batch size.

        Written for few tensor operations per step: on layers this small the per-operation overhead,
        not the arithmetic, is what costs.
        """
        captured = [s for s in self.slots if s.pairs]
        n = self._batch_size(captured)
        scale = float(n) if loss_reduction == "mean" else 1.0
        denom = float(expected_batch_size) if loss_reduction == "mean" else 1.0
        std = noise_multiplier * max_grad_norm / denom
        if std > 0:
            self._flat.normal_(0.0, std, generator=generator)
        else:
            self._flat.zero_()
        total: torch.Tensor | None = None
        views: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []
        others: list[dict[torch.Tensor, torch.Tensor]] = []
        for s in captured:
            if isinstance(s, _NormSlot):  # per-sample gradients from Opacus' function for the type
                inputs, backprops = s.pairs[0]
                per_sample: dict[torch.Tensor, torch.Tensor] = GradSampleModule.GRAD_SAMPLERS[type(s.module)](
                    s.module, inputs, backprops
                )
                for gs in per_sample.values():
                    sq = gs.reshape(n, -1).square().sum(1)
                    total = sq if total is None else total.add_(sq)
                others.append(per_sample)
                continue
            a, g = s.pairs[0]
            layer = s.module
            if a.dim() != 2:  # a sequence: each sample's gradient materialised, clipped from those numbers
                a, g = a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])
                weight, bias_grad = linear_sample_grads(a, g, layer.bias is not None)
                per_sample = {layer.weight: weight}
                if bias_grad is not None:
                    per_sample[layer.bias] = bias_grad
                for gs in per_sample.values():
                    sq = gs.reshape(n, -1).square().sum(1)
                    total = sq if total is None else total.add_(sq)
                others.append(per_sample)
                continue
            part = linear_sample_norms(a, g, layer.bias is not None, self._one)
            total = part.square() if total is None else total.addcmul_(part, part)
            views.append((layer, a, g))
        # Rows whose gradient is not finite add nothing (their factor is 0 and their values are made finite).
        # On the CPU the values are made finite only when some row needs it: one look at the norms costs
        # less than the extra passes, and in the kernel the step's time tells its own code nothing it could
        # not read. On a GPU a look would wait for the device, so the passes always run there.
        finite = False
        if not n:  # an empty Poisson batch: the gradient is the noise alone
            views, others = [], []
        elif total is not None:
            finite = total.device.type == "cpu" and math.isfinite(float(total.sum()))  # squares: no cancelling
            # Opacus' clip factor min(1, C / (s |g_i| + 1e-6)) (s: the mean-loss scale), times s / E,
            # computed as min(s / E, (C / E) / (|g_i| + 1e-6 / s))
            factor = total.sqrt_().add_(1e-6 / scale).reciprocal_().mul_(max_grad_norm / denom)
            factor = factor.nan_to_num_(nan=0.0).clamp_(max=scale / denom)  # not finite: adds nothing
        grads = dict(zip(self.params, self._views, strict=True))
        for layer, a, g in views:
            bias = None
            if layer.bias is not None:  # nn.Linear types it as always there; bias=False leaves None
                bias = grads[layer.bias]
            add_clipped_linear(grads[layer.weight], bias, a, g, factor, finite=finite)
        for per_sample in others:
            for p, gs in per_sample.items():
                add_clipped(grads[p], factor, gs, finite=finite)
        for p, grad in grads.items():
            p.grad = grad
        self.clear()
        return n

    @staticmethod
    def _batch_size(captured: list[_Slot]) -> int:
        for s in captured:
            if len(s.pairs) > 1:
                raise FastPathError(
                    f"layer '{s.name}' saw {len(s.pairs)} backward passes before optimizer.step(); call "
                    "optimizer.step() after each loss.backward() (gradient accumulation cannot be combined "
                    "with Poisson sampling)"
                )
        batch = {s.pairs[0][1].shape[0] for s in captured}
        if len(batch) > 1:
            raise FastPathError(f"layers saw different batch sizes {sorted(batch)} in one step; use mode='hooks'")
        return batch.pop() if batch else 0


def _make_forward(clipper: FastClipper, slot: _LinearSlot) -> Callable[[nn.Linear, torch.Tensor], torch.Tensor]:
    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        if slot.last_pass == clipper.pass_id:
            raise FastPathError(
                f"layer '{slot.name}' ran twice in one forward pass; paitient's fast clipping needs each "
                "Linear layer once per pass. Use make_private(..., mode='hooks')."
            )
        slot.last_pass = clipper.pass_id
        return capture_linear(x, self.weight, self.bias, slot)

    return forward


def _make_capture(clipper: FastClipper, slot: _NormSlot) -> Callable[[nn.Module, tuple[object, ...], object], None]:
    def hook(module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        if slot.last_pass == clipper.pass_id:
            raise FastPathError(f"layer '{slot.name}' ran twice in one forward pass; use mode='hooks'")
        slot.last_pass = clipper.pass_id
        acts: list[object] = [x.detach() if isinstance(x, torch.Tensor) else x for x in inputs]
        output.register_hook(lambda g: slot.pairs.append((acts, g.detach())))

    return hook


class FastDPOptimizer(torch.optim.Optimizer):
    """Wraps the user's optimizer: ``step()`` makes the private gradient, then runs the original step.

    ``before_step``/``after_step`` let the training run refuse steps beyond its reservation and count
    the ones taken for the accountant.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        clipper: FastClipper,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        loss_reduction: LossReduction = "mean",
        generator: torch.Generator | None = None,
        before_step: Callable[[], None] | None = None,
        after_step: Callable[[int], None] | None = None,
    ):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.original_optimizer = optimizer
        self.clipper = clipper
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.loss_reduction = loss_reduction
        self.generator = generator
        self.before_step = before_step
        self.after_step = after_step
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}

    # The parameter groups, state and defaults are the original optimizer's: properties where torch's
    # Optimizer has plain attributes (mypy takes a read-only property over an attribute for a bad override).
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.original_optimizer.param_groups = value

    @property
    def state(self) -> defaultdict[torch.Tensor, Any]:  # type: ignore[override]  # read-only
        return self.original_optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]  # read-only
        return self.original_optimizer.defaults

    def state_dict(self) -> dict[str, Any]:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise FastPathError("parameters cannot be added to a private optimizer; make a new private run")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original_optimizer.zero_grad(set_to_none)
        self.clipper.clear()

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """The private gradient (clipped, noised, scaled) into ``.grad``, then the original optimizer's step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.before_step is not None:
            self.before_step()
        n = 0
        try:
            n = self.clipper.private_grads(
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                expected_batch_size=self.expected_batch_size,
                loss_reduction=self.loss_reduction,
                generator=self.generator,
            )
            self.original_optimizer.step()
        except FastPathError:
            raise  # refused before the noise was drawn: nothing released, no step
        except BaseException:
            # interrupted (a kernel interrupt raises KeyboardInterrupt wherever it lands, often inside a long
            # optimizer step) or failed after the noisy gradient was in .grad, perhaps in the parameters:
            # the step counts for the accountant (counting one too many is the safe side)
            if self.after_step is not None:
                self.after_step(n)
            raise
        if self.after_step is not None:
            self.after_step(n)
        return loss

    def __repr__(self) -> str:
        return f"FastDPOptimizer({self.original_optimizer!r}, noise_multiplier={self.noise_multiplier:g})"
