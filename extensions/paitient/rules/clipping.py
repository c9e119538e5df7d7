"""Per-sample clipping of linear layers without per-sample gradients ("book-keeping"), as pure tensor math.

For a linear layer with activations ``a`` (B x in) and backprops ``g`` (B x out; the gradient of the
summed per-sample losses with respect to the layer's output), sample i's weight gradient is the outer
product ``g_i a_i^T``, so

- its norm is ``|g_i| * |a_i|`` (with the bias: ``|g_i| * sqrt(|a_i|^2 + 1)``): a product of norms, no
  sum of terms that can cancel,
- the sum of the clipped per-sample gradients is one matrix product: ``(c * g)^T a``.

For a layer fed a sequence (B x T x in) sample i's gradient is ``sum_t g_it a_it^T``, a sum over the
steps whose terms can cancel: a graph can make two steps' backprops ``(1 + S) g`` and ``-S g``, so the
gradient is ``g a^T`` while each term is S times larger. Its norm computed without the gradient (the
"ghost" norm ``sum_ts (g_t . g_s)(a_t . a_s)``, terms S^2 larger) rounds to anything at S ~ 1e5 in float32,
zero or below included, and the row then went into the sum unclipped. So for sequences
:func:`linear_sample_grads` materialises each sample's gradient (``g_i^T a_i``) and the caller takes its
norm and adds ``sum_i c_i G_i`` from that same tensor: whatever rounding made ``G_i``, the row adds at most
the bound.

:class:`CaptureLinear` is ``F.linear`` whose backward computes only the gradient of its input and hands
``(a, g)`` to a slot; :func:`linear_sample_norms` and :func:`add_clipped_linear` turn them into norms and
the clipped sum (2-D), :func:`linear_sample_grads` into per-sample gradients (sequences). The kernel's fast
DP path (module layers) and the jobs runner's (functional graphs) both clip with these, so both give the
same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F


class Slot(Protocol):
    """Where :class:`CaptureLinear` leaves ``(activation, backprop)`` at each backward pass."""

    pairs: list[tuple[torch.Tensor, torch.Tensor]]


class CaptureLinear(torch.autograd.Function):
    """``F.linear`` whose backward returns only the input gradient and keeps (activation, backprop)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, slot: Slot) -> torch.Tensor:
        # ctx: torch's context object, which takes any attribute (``slot`` here)
        ctx.save_for_backward(x, weight)
        ctx.slot = slot
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        x, weight = ctx.saved_tensors
        ctx.slot.pairs.append((x, grad_out))
        grad_x = grad_out.matmul(weight) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


capture_linear: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, Slot], torch.Tensor]
capture_linear = CaptureLinear.apply  # torch leaves ``apply`` unannotated: its signature, from forward's


def linear_sample_norms(a: torch.Tensor, g: torch.Tensor, bias: bool, one: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample norm of one linear layer's gradient (weight and bias) from activations and backprops.

    ``a`` and ``g`` are B x in and B x out (for sequences, :func:`linear_sample_grads`); ``one`` is a scalar
    1 of their dtype (passed in so a caller stepping often does not make it each time).
    """
    if a.dim() != 2 or g.dim() != 2:
        raise ValueError("linear_sample_norms takes B x in activations; for sequences use linear_sample_grads")
    # |g_i a_i^T| = |g_i| |a_i|; with the bias |g_i| sqrt(|a_i|^2 + 1)
    gn: torch.Tensor = torch.linalg.vector_norm(g, dim=1)
    an: torch.Tensor = torch.linalg.vector_norm(a, dim=1)
    if not bias:
        return gn.mul_(an)
    if one is None:
        one = torch.ones((), dtype=a.dtype, device=a.device)
    return gn.mul_(torch.hypot(an, one))


def linear_sample_grads(a: torch.Tensor, g: torch.Tensor, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each sample's weight gradient (B x out x in) and bias gradient (B x out, or None) of a linear layer fed
    a sequence: ``a`` B x T x in, ``g`` B x T x out.

    The caller clips from these tensors themselves: their norms and ``tensordot(factor, G)`` (see the
    module's description for why not from the ghost norm).
    """
    if a.dim() != 3 or g.dim() != 3:
        raise ValueError("linear_sample_grads takes B x T x in activations and B x T x out backprops")
    return torch.bmm(g.transpose(1, 2), a), (g.sum(1) if bias else None)


def add_clipped_linear(
    grad_w: torch.Tensor,
    grad_b: torch.Tensor | None,
    a: torch.Tensor,
    g: torch.Tensor,
    factor: torch.Tensor,
    *,
    finite: bool = False,
) -> None:
    """Add ``sum_i factor_i * grad_i`` of one linear layer into ``grad_w`` (and ``grad_b``), in place.

    ``a`` and ``g`` are B x in and B x out, as for :func:`linear_sample_norms`; ``factor`` holds one number per
    sample. ``finite``: the caller knows every row's norm is finite (so are ``a`` and ``g``), and the step
    that makes a non-finite row add nothing is left out.
    """
    if a.dim() != 2 or g.dim() != 2:
        raise ValueError("add_clipped_linear takes B x in activations; for sequences use linear_sample_grads")
    gt = g.t()
    if finite:
        grad_w.addmm_(gt * factor, a)  # (c g)^T a: the sum of the clipped per-sample gradients
        if grad_b is not None:
            grad_b.addmv_(gt, factor)
        return
    # A row whose gradient is not finite has factor 0 (clip_factors), and its infinities must not make
    # 0 * inf = NaN in the sum: both sides are made finite (a no-op for every other row, whose values are)
    cg = (gt * factor).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    grad_w.addmm_(cg, a.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0))
    if grad_b is not None:
        grad_b.add_(cg.sum(1))


def clip_factors(sq_norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Each sample's clip factor ``min(1, C / (|grad_i| + 1e-6))`` from its squared gradient norm; 0 for a
    sample whose squared norm is not finite (an infinity or a NaN in its gradient, or a norm beyond float
    range): such a row adds nothing, where one NaN would have made the whole sum NaN, and the weights'
    being NaN or not would tell whether the dataset holds such a row."""
    return (max_grad_norm / (sq_norms.sqrt() + 1e-6)).nan_to_num_(nan=0.0).clamp_(max=1.0)


def add_clipped(total: torch.Tensor, factor: torch.Tensor, per_sample: torch.Tensor, *, finite: bool = False) -> None:
    """Add ``sum_i factor_i * per_sample_i`` into ``total``, in place; a row with factor 0 (one whose gradient
    is not finite, :func:`clip_factors`) adds exactly nothing, infinities and NaNs included. ``finite`` as for
    :func:`add_clipped_linear`."""
    if not finite:
        per_sample = per_sample.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    total.add_(torch.tensordot(factor, per_sample, dims=1))
