"""The sum of per-sample gradients clipped in total L2 norm, over a functional model: two ways, one answer.

The runner's model is a function ``forward(params, x)`` (an exported graph under ``functional_call``), so
there are no layer objects to hook. Two computations give the clipped sum
``sum_i min(1, C / (|grad_i| + 1e-6)) grad_i`` of a batch:

- :func:`exact_clipped_sum`: ``torch.func.vmap`` of ``grad`` of one row's loss, in chunks. Any model the
  functional forward expresses, each row run on its own; one gradient per row is materialised.
- :class:`FastClipper`: one forward and one backward pass of the whole batch. While the forward runs, a
  torch function mode sees every operator call that reads a parameter:

  - a linear layer (``aten.linear``) runs as :class:`paitient.rules.clipping.CaptureLinear`: its backward
    computes only its input's gradient and keeps (activation, backprop), from which the per-sample norms
    and the clipped sum follow without per-sample gradients (book-keeping, :mod:`paitient.rules.clipping`);
    fed a sequence (B x T x in), its per-sample gradients are materialised (``g_i^T a_i``) and clipped as
    they are, since a norm computed without them can cancel to anything;
  - a convolution (``aten.conv1d``/``conv2d``, one group) keeps the same pair; its per-sample gradients are
    products of the backprop and the unfolded input, small for the kernels small models use;
  - any other operator that reads a parameter (normalisation, embedding, elementwise arithmetic) keeps its
    inputs and backprop, and its parameters' per-sample gradients are ``vmap`` of ``vjp`` of that one
    operator over the rows.

  The fast way holds only when the model treats rows independently along the first dimension and
  every parameter is read by exactly one operator call that sees the batch there. The calls are checked
  each step (shapes, each parameter read once, no gradient escaping the captures: :class:`Unsupported`
  otherwise), and before training :func:`fast_path_agrees` compares it with the exact way on a probe
  batch of synthetic rows whose size is a prime no dimension of the model has; a model that mixes rows
  (a mean over the batch), draws randomness (dropout) or reads a parameter twice trains the exact way.

Both ways also return each row's loss from the same pass, for progress reports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from paitient.rules.clipping import (
    add_clipped,
    add_clipped_linear,
    capture_linear,
    clip_factors,
    linear_sample_grads,
    linear_sample_norms,
)

Forward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]
SampleLosses = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""Outputs and targets of B rows -> the B per-row losses."""
Clipped = tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]
"""(sum of the clipped per-sample gradients by parameter name, per-sample gradient norms, per-sample losses)."""

PER_SAMPLE_BUDGET = 1 << 25
"""Per-sample gradient values held at once (128 MB of float32): the exact way's chunk, the fast way's limit."""

_LINEAR = frozenset({torch.ops.aten.linear.default, F.linear})
_CONV = {torch.ops.aten.conv1d.default: 1, torch.ops.aten.conv2d.default: 2, F.conv1d: 1, F.conv2d: 2}


class Unsupported(Exception):
    """The fast way cannot clip this model's step correctly; the exact way does it instead."""


class _Use:
    """One operator call that reads parameters: what it was called with, and its (inputs, backprop)."""

    __slots__ = ("func", "flat", "spec", "names", "kind", "pairs")

    def __init__(self, func: Any, flat: list[Any], spec: Any, names: list[str | None], kind: str):
        self.func = func
        self.flat = flat
        self.spec = spec
        self.names = names
        """Per flattened argument: the parameter's name, or None."""
        self.kind = kind
        self.pairs: list[tuple[Any, torch.Tensor]] = []

    def params(self) -> list[str]:
        return [n for n in self.names if n is not None]

    def call(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The operator on the call's arguments with its tensor arguments replaced, in order, by ``tensors``."""
        flat = list(self.flat)
        it = iter(tensors)
        for i, a in enumerate(flat):
            if isinstance(a, torch.Tensor):
                flat[i] = next(it)
        args, kwargs = tree_unflatten(flat, self.spec)
        out: torch.Tensor = self.func(*args, **kwargs)
        return out


class _CaptureOp(torch.autograd.Function):
    """An operator call whose backward computes only its inputs' gradients and keeps (inputs, backprop)."""

    @staticmethod
    def forward(ctx: Any, use: _Use, *tensors: torch.Tensor) -> torch.Tensor:
        tensor_names = [n for n, a in zip(use.names, use.flat, strict=True) if isinstance(a, torch.Tensor)]
        inner = [
            t.detach() if name is not None else t.detach().requires_grad_(t.requires_grad)
            for t, name in zip(tensors, tensor_names, strict=True)
        ]
        with torch.enable_grad():
            out = use.call(inner)
        ctx.use, ctx.inner, ctx.names, ctx.out = use, inner, tensor_names, out
        return out.detach()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inputs = [t.detach() for t, name in zip(ctx.inner, ctx.names, strict=True) if name is None]
        ctx.use.pairs.append((inputs, grad_out))
        grads: list[torch.Tensor | None] = [None] * len(ctx.inner)
        wanted = [i for i, t in enumerate(ctx.inner) if ctx.names[i] is None and t.requires_grad]
        if wanted and ctx.out.requires_grad:
            got = torch.autograd.grad(ctx.out, [ctx.inner[i] for i in wanted], grad_out, allow_unused=True)
            for i, g in zip(wanted, got, strict=True):
                grads[i] = g
        return (None, *grads)


_capture_op: Callable[..., torch.Tensor] = _CaptureOp.apply


class _Recorder(TorchFunctionMode):
    """Runs every operator call that reads a parameter through a capturing function, and lists the calls."""

    def __init__(self, leaves: dict[str, torch.Tensor], batch: int):
        super().__init__()
        self.by_id = {id(t): name for name, t in leaves.items()}
        self.batch = batch
        self.uses: list[_Use] = []
        self.seen: set[str] = set()

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if not self._reads_parameter(args, kwargs) or getattr(func, "__name__", "") == "__get__":
            return func(*args, **kwargs)  # no parameter, or an attribute read (shape, dtype): no arithmetic
        flat, spec = tree_flatten((args, kwargs))
        names = [self.by_id.get(id(a)) if isinstance(a, torch.Tensor) else None for a in flat]
        if not any(names):
            return func(*args, **kwargs)
        for name in names:
            if name is not None:
                if name in self.seen:
                    raise Unsupported(f"parameter {name} is read by more than one operation")
                self.seen.add(name)
        inputs = [a for a, n in zip(flat, names, strict=True) if isinstance(a, torch.Tensor) and n is None]
        if not inputs or any(a.dim() == 0 or a.shape[0] != self.batch for a in inputs):
            raise Unsupported(f"{func} reads parameters without the batch along its inputs' first dimension")
        kind = self._kind(func, args, kwargs, names, flat)
        use = _Use(func, flat, spec, names, kind)
        if kind == "linear":
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            out = capture_linear(args[0], args[1], bias, use)
        else:
            out = _capture_op(use, *[a for a in flat if isinstance(a, torch.Tensor)])
        if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != self.batch:
            raise Unsupported(f"{func} does not keep the batch along its output's first dimension")
        self.uses.append(use)
        return out

    def _reads_parameter(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether a parameter may be among the arguments (a quick look; containers are looked into later)."""
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                if id(a) in self.by_id:
                    return True
            elif isinstance(a, list | tuple | dict):
                return True
        return False

    def _is(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and id(t) in self.by_id

    def _kind(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], names: list[Any], flat: list[Any]) -> str:
        """``linear``: input, weight parameter, optional bias parameter; ``conv``: the same for one group of a
        convolution with no other tensor; ``op`` otherwise."""
        if len(args) < 2 or not isinstance(args[0], torch.Tensor) or self._is(args[0]) or not self._is(args[1]):
            return "op"
        tensors = sum(isinstance(a, torch.Tensor) for a in flat)
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if bias is not None and not self._is(bias):
            return "op"
        if func in _LINEAR and len(args) <= 3 and set(kwargs) <= {"bias"}:
            return "linear"
        if func in _CONV and tensors == 2 + (bias is not None) and not kwargs:
            groups = args[6] if len(args) > 6 else 1
            if groups == 1 and args[0].dim() == _CONV[func] + 2:
                return "conv"
        return "op"


class FastClipper:
    """The clipped sum of a batch from one forward and one backward pass (see the module's description)."""

    def __init__(self, forward: Forward, sample_losses: SampleLosses):
        self.forward = forward
        self.sample_losses = sample_losses

    def clipped_sum(
        self,
        leaves: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        max_grad_norm: float,
        *,
        scale: float = 1.0,
        into: dict[str, torch.Tensor] | None = None,
        weights: torch.Tensor | None = None,
    ) -> Clipped:
        """``leaves``: the parameters as tensors that require grad (their ``.grad`` is left as it was).

        The sum is multiplied by ``scale`` and added into ``into`` (new zero tensors if None), which is
        returned; nothing is added there unless the whole computation succeeds. ``weights`` (one number a
        row) multiplies each row's clipped gradient in the sum: a padded step's 0/1 mask, so padding rows add
        nothing; the norms and losses returned are every row's, padding too.
        """
        if len(x) == 0:
            return _nothing(leaves, into)
        before = {k: v.grad for k, v in leaves.items()}
        recorder = _Recorder(leaves, len(x))
        with recorder:
            out = self.forward(leaves, x)
        if recorder.seen != set(leaves):
            missing = sorted(set(leaves) - recorder.seen)[:3]
            raise Unsupported(f"parameters {missing} were not seen read by an operation")
        losses = self.sample_losses(out, y)
        if not losses.requires_grad:
            raise Unsupported("the loss does not depend on the parameters through the captured operations")
        losses.sum().backward()
        if any(v.grad is not before[k] for k, v in leaves.items()):
            for k, v in leaves.items():
                v.grad = before[k]
            raise Unsupported("a gradient reached a parameter outside the captured operations")
        with torch.no_grad():
            return self._finish(recorder.uses, leaves, len(x), max_grad_norm, losses.detach(), scale, into, weights)

    def _finish(
        self,
        uses: list[_Use],
        leaves: dict[str, torch.Tensor],
        n: int,
        max_grad_norm: float,
        losses: torch.Tensor,
        scale: float,
        into: dict[str, torch.Tensor] | None,
        weights: torch.Tensor | None = None,
    ) -> Clipped:
        proto = next(iter(leaves.values()))
        sq = torch.zeros(n, dtype=proto.dtype, device=proto.device)
        kept: list[tuple[_Use, Any]] = []
        held = 0
        for use in uses:
            if len(use.pairs) != 1:
                raise Unsupported(f"{use.func} saw {len(use.pairs)} backward passes")
            inputs, g = use.pairs[0]
            if use.kind == "linear":
                a = inputs if isinstance(inputs, torch.Tensor) else inputs[0]
                bias = len(use.params()) > 1
                if a.dim() == 2:
                    sq.add_(linear_sample_norms(a, g, bias).square_())
                    kept.append((use, (a, g)))
                    continue
                if held + n * a.shape[-1] * g.shape[-1] > PER_SAMPLE_BUDGET:  # before making them
                    raise Unsupported("the per-sample gradients of the layers clipped row by row are too large to hold")
                per = _linear_per_sample(use, a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1]), bias)
            elif use.kind == "conv":
                per = _conv_per_sample(use, inputs[0], g)
            else:
                per = _op_per_sample(use, leaves, inputs, g)
            for name, gs in per.items():
                held += gs.numel()
                if gs.shape[0] != n:
                    raise Unsupported(f"per-sample gradients of {name} have no batch dimension")
                sq.add_(gs.reshape(n, -1).square().sum(1))
            if held > PER_SAMPLE_BUDGET:
                raise Unsupported("the per-sample gradients of the layers clipped row by row are too large to hold")
            kept.append((use, per))
        factor = clip_factors(sq, max_grad_norm)
        if weights is not None:
            factor = factor.mul_(weights)
        if scale != 1.0:
            factor = factor.mul_(scale)
        total = into if into is not None else {k: torch.zeros_like(v) for k, v in leaves.items()}
        for use, held_for in kept:
            if isinstance(held_for, tuple):  # a 2-D linear layer's (activation, backprop)
                a, g = held_for
                names = use.params()
                add_clipped_linear(total[names[0]], total[names[1]] if len(names) > 1 else None, a, g, factor)
            else:
                for name, gs in held_for.items():
                    add_clipped(total[name], factor, gs)
            use.pairs.clear()
        return total, sq.sqrt_(), losses


def _linear_per_sample(use: _Use, a: torch.Tensor, g: torch.Tensor, bias: bool) -> dict[str, torch.Tensor]:
    """Per-sample gradients of a linear layer fed a sequence (B x T x in): materialised, so that its rows'
    norms and their clipped sum come from the same numbers (:mod:`paitient.rules.clipping`)."""
    names = use.params()
    weight, bias_grad = linear_sample_grads(a, g, bias)
    out = {names[0]: weight}
    if bias_grad is not None:
        out[names[1]] = bias_grad
    return out


def _conv_per_sample(use: _Use, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample gradients of a one-group convolution: its backprop times the unfolded input (``im2col``)."""
    args, _ = tree_unflatten(use.flat, use.spec)
    weight: torch.Tensor = args[1]
    dims = weight.dim() - 2
    stride, padding, dilation = (
        _tuple(args[i] if len(args) > i else None, dims, d) for i, d in ((3, 1), (4, 0), (5, 1))
    )
    if isinstance(padding, str):
        raise Unsupported("a convolution with padding given by name")
    if dims == 1:  # as a 2-D convolution of height 1
        a, g = a.unsqueeze(2), g.unsqueeze(2)
        stride, padding, dilation = (1, *stride), (0, *padding), (1, *dilation)
    n, out_channels = g.shape[0], g.shape[1]
    cols = _columns(a, tuple(weight.shape[2:]) if dims == 2 else (1, weight.shape[2]), stride, padding, dilation, g)
    gm = g.reshape(n, out_channels, -1)  # n x out x L
    names = use.params()
    out = {names[0]: torch.bmm(gm, cols.transpose(1, 2)).reshape(n, *weight.shape)}
    if len(names) > 1:
        out[names[1]] = gm.sum(2)
    return out


def _columns(
    a: torch.Tensor,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    g: torch.Tensor,
) -> torch.Tensor:
    """The input unfolded to n x (channels kh kw) x (Ho Wo), the layout of the weight's (in, kh, kw), one
    strided copy per kernel offset (several times faster here than ``F.unfold`` for the same tensor)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    if ph or pw:
        a = F.pad(a, (pw, pw, ph, ph))
    n, c = a.shape[:2]
    ho, wo = g.shape[2], g.shape[3]
    if (ho - 1) * sh + (kh - 1) * dh >= a.shape[2] or (wo - 1) * sw + (kw - 1) * dw >= a.shape[3]:
        raise Unsupported("a convolution whose output does not fit its input")
    cols = a.new_empty((n, c, kh, kw, ho, wo))
    for i in range(kh):
        for j in range(kw):
            r, q = i * dh, j * dw
            cols[:, :, i, j] = a[:, :, r : r + sh * (ho - 1) + 1 : sh, q : q + sw * (wo - 1) + 1 : sw]
    return cols.view(n, c * kh * kw, ho * wo)


def _tuple(value: Any, dims: int, default: int) -> Any:
    if value is None:
        return (default,) * dims
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return (value,) * dims
    values = tuple(int(v) for v in value)
    return values * dims if len(values) == 1 else values


def _op_per_sample(
    use: _Use, leaves: dict[str, torch.Tensor], inputs: list[torch.Tensor], g: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of the parameters one operator call reads: ``vmap`` over rows of its ``vjp``."""
    from torch.func import vjp, vmap

    tensor_names = [n for n, a in zip(use.names, use.flat, strict=True) if isinstance(a, torch.Tensor)]
    names = [n for n in tensor_names if n is not None]
    values = [leaves[n].detach() for n in names]

    def one(row_inputs: list[torch.Tensor], row_g: torch.Tensor) -> tuple[torch.Tensor, ...]:
        def op(*params: torch.Tensor) -> torch.Tensor:
            rows, ps = iter(row_inputs), iter(params)
            return use.call([next(ps) if n is not None else next(rows).unsqueeze(0) for n in tensor_names])

        pull = vjp(op, *values)[1]
        grads: tuple[torch.Tensor, ...] = pull(row_g.unsqueeze(0))
        return grads

    per = vmap(one)(inputs, g)
    return dict(zip(names, per, strict=True))


def exact_clipped_sum(
    forward: Forward,
    sample_losses: SampleLosses,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    max_grad_norm: float,
    *,
    scale: float = 1.0,
    into: dict[str, torch.Tensor] | None = None,
    weights: torch.Tensor | None = None,
) -> Clipped:
    """The clipped sum from each row's own gradient (``vmap`` of ``grad``), in chunks that fit the budget;
    ``scale``, ``into`` and ``weights`` as for :meth:`FastClipper.clipped_sum`."""
    from torch.func import grad_and_value, vmap

    if len(x) == 0:
        return _nothing(params, into)
    detached = {k: v.detach() for k, v in params.items()}

    def row_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return sample_losses(forward(p, xi.unsqueeze(0)), yi.unsqueeze(0)).sum()

    per_row = vmap(grad_and_value(row_loss), in_dims=(None, 0, 0), randomness="different")
    numel = sum(v.numel() for v in detached.values())
    chunk = max(1, min(1024, PER_SAMPLE_BUDGET // max(1, numel)))
    total = {k: torch.zeros_like(v) for k, v in detached.items()}
    norms, losses = [], []
    with torch.no_grad():
        for start in range(0, len(x), chunk):
            grads, loss = per_row(detached, x[start : start + chunk], y[start : start + chunk])
            sq = torch.stack([g.reshape(g.shape[0], -1).square().sum(1) for g in grads.values()]).sum(0)
            factor = clip_factors(sq, max_grad_norm)
            if weights is not None:
                factor = factor.mul_(weights[start : start + chunk])
            for k, g in grads.items():
                add_clipped(total[k], factor, g)
            norms.append(sq.sqrt())
            losses.append(loss.detach())
        if into is not None:
            for k, t in total.items():
                into[k].add_(t, alpha=scale)
            total = into
        elif scale != 1.0:
            for t in total.values():
                t.mul_(scale)
    return total, torch.cat(norms), torch.cat(losses)


def _nothing(params: dict[str, torch.Tensor], into: dict[str, torch.Tensor] | None) -> Clipped:
    """The clipped sum of no row: zero (``into`` as it was), no norms, no losses."""
    proto = next(iter(params.values()))
    total = into if into is not None else {k: torch.zeros_like(v.detach()) for k, v in params.items()}
    empty = proto.new_zeros(0).detach()
    return total, empty, empty.clone()


def probe_size(shapes: Sequence[Sequence[int]]) -> int:
    """The smallest prime of at least 11 that is no dimension of the given shapes (the probe batch's size)."""
    taken = {int(d) for shape in shapes for d in shape}
    n = 11
    while n in taken or any(n % p == 0 for p in range(2, int(n**0.5) + 1)):
        n += 1
    return n


def fast_path_agrees(
    clipper: FastClipper,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int,
    loss: str,
) -> bool:
    """Whether the fast way gives the exact way's norms and clipped sum on a probe batch.

    The probe's rows are synthetic (standard normal rows of the input's shape, drawn on the CPU and moved
    to ``x``'s device; for integer inputs, rows drawn from ``x``) with targets of the loss's kind, so the
    choice does not depend on the training rows' values; its size is :func:`probe_size` of the input's and
    parameters' shapes, so a dimension that only equals the batch by coincidence shows. The clipping bound
    is the median exact norm: some rows are clipped, some not.

    This is a check of correctness (the fast way computes the rows' true gradients on ordinary rows), not
    what the privacy bound rests on: each row's share of the fast way's sum is computed from the same
    numbers as its norm, so it is at most the bound on any row, at any scale, whatever this probe saw.
    """
    gen = torch.Generator().manual_seed(int(seed))
    n = probe_size([x.shape[1:], *(v.shape for v in params.values()), y.shape[1:]])
    if x.is_floating_point():
        xp = torch.randn((n, *x.shape[1:]), generator=gen, dtype=x.dtype).to(x.device)
    else:
        xp = x[torch.randint(0, len(x), (n,), generator=gen).to(x.device)]
    with torch.no_grad():
        out = clipper.forward({k: v.detach() for k, v in params.items()}, xp)
    if loss == "cross_entropy":
        if out.dim() < 2:
            return False
        yp = torch.randint(0, out.shape[1], (n, *y.shape[1:]), generator=gen).to(y.device, y.dtype)
    elif loss in ("bce_with_logits", "smooth_hinge"):
        yp = torch.randint(0, 2, (n, *y.shape[1:]), generator=gen).to(y.device, y.dtype)
    else:
        yp = torch.randn((n, *y.shape[1:]), generator=gen).to(y.device, y.dtype)
    detached = {k: v.detach() for k, v in params.items()}
    want, norms, _ = exact_clipped_sum(clipper.forward, clipper.sample_losses, detached, xp, yp, 1.0)
    bound = float(norms.median())
    if not bound > 0:
        return False
    want, norms, _ = exact_clipped_sum(clipper.forward, clipper.sample_losses, detached, xp, yp, bound)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    try:
        got, got_norms, _ = clipper.clipped_sum(leaves, xp, yp, bound)
    except Unsupported:
        return False
    if not torch.allclose(got_norms, norms, rtol=1e-3, atol=1e-6 * float(norms.max())):
        return False
    return all(
        torch.allclose(got[k], want[k], rtol=1e-3, atol=1e-4 * (float(want[k].abs().max()) + 1e-12)) for k in want
    )
