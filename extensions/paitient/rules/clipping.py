"""Per-sample clipping of linear layers without per-sample gradients ("book-keeping"), as pure tensor math.

For a linear layer with activations ``a`` (B x in) and backprops ``g`` (B x out; the gradient of the
summed per-sample losses with respect to the layer's output), sample i's weight gradient is the outer
product ``g_i a_i^T``, so

- its norm is ``|g_i| * |a_i|`` (with the bias: ``|g_i| * sqrt(|a_i|^2 + 1)``; for 3-D inputs,
  B x T x d, ``sqrt(sum((g g^T) * (a a^T)))`` or the norm of ``g^T a``, whichever is cheaper),
- the sum of the clipped per-sample gradients is one matrix product: ``(c * g)^T a``.

:class:`CaptureLinear` is ``F.linear`` whose backward computes only the gradient of its input and hands
``(a, g)`` to a slot; :func:`linear_sample_norms` and :func:`add_clipped_linear` turn them into norms and
the clipped sum. The kernel's fast DP path (module layers) and the jobs runner's (functional graphs) both
clip with these, so both give the same numbers.
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

    ``a`` and ``g`` are B x in and B x out, or B x T x in and B x T x out; ``one`` is a scalar 1 of their
    dtype (passed in so a caller stepping often does not make it each time).
    """
    if a.dim() == 2:  # |g_i a_i^T| = |g_i| |a_i|; with the bias |g_i| sqrt(|a_i|^2 + 1)
        gn: torch.Tensor = torch.linalg.vector_norm(g, dim=1)
        an: torch.Tensor = torch.linalg.vector_norm(a, dim=1)
        if not bias:
            return gn.mul_(an)
        if one is None:
            one = torch.ones((), dtype=a.dtype, device=a.device)
        return gn.mul_(torch.hypot(an, one))
    t = a.shape[1]
    if t * t <= a.shape[2] * g.shape[2]:  # ghost norm: sum over (t, s) of (g_t . g_s)(a_t . a_s)
        sq = (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum((1, 2))
    else:
        sq = torch.bmm(g.transpose(1, 2), a).square().sum((1, 2))
    if bias:
        sq = sq + g.sum(1).square().sum(1)
    return sq.clamp_(min=0).sqrt_()


def add_clipped_linear(
    grad_w: torch.Tensor, grad_b: torch.Tensor | None, a: torch.Tensor, g: torch.Tensor, factor: torch.Tensor
) -> None:
    """Add ``sum_i factor_i * grad_i`` of one linear layer into ``grad_w`` (and ``grad_b``), in place.

    ``a`` and ``g`` as for :func:`linear_sample_norms`; ``factor`` holds one number per sample.
    """
    if g.dim() == 2:
        gt = g.t()
        grad_w.addmm_(gt * factor, a)  # (c g)^T a: the sum of the clipped per-sample gradients
        if grad_b is not None:
            grad_b.addmv_(gt, factor)
        return
    cg = (g * factor[:, None, None]).reshape(-1, g.shape[-1])
    grad_w.addmm_(cg.t(), a.reshape(-1, a.shape[-1]))
    if grad_b is not None:
        grad_b.add_(cg.sum(0))


def clip_factors(sq_norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Each sample's clip factor ``min(1, C / (|grad_i| + 1e-6))`` from its squared gradient norm."""
    return (max_grad_norm / (sq_norms.sqrt() + 1e-6)).clamp_(max=1.0)
