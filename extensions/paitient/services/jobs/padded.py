"""A DP-SGD step over a Poisson sample padded to a fixed number of rows, and that step as a CUDA graph.

A Poisson sample's size varies from step to step, and a CUDA graph replays kernels of fixed shapes. So
:class:`PaddedStep` takes :func:`capacity` rows: the sampled rows, then copies of row 0 to fill, each
with a 0/1 weight that multiplies its clipped gradient in the sum (``weights`` of
:mod:`paitient.services.jobs.persample`) and its loss in the progress sum. A padding row adds exactly
nothing and counts for nothing; the noised, clipped sum divided by the expected batch size is the
unpadded step's to float rounding. A sample larger than the capacity is never cut (a row left out would
break the accounting, which assumes every sampled row is in): that step runs unpadded, the way every
step runs without padding. The capacity's margin of :data:`SIGMAS` standard deviations of the sample size
makes that rare (about 3 steps in 10 million by the normal approximation).

:class:`Stepper` runs each step: padded when the sample fits, unpadded when it does not; and with
``capture`` on CUDA, the padded step as a ``torch.cuda.CUDAGraph``: :data:`WARMUP` steps run
eagerly on a side stream (the optimiser's state, cuBLAS' and cuDNN's workspaces are made then), then the
step's work (gathering the rows, forward, per-sample clipping, noise, optimiser update) is captured once
and replayed at every later step: one launch instead of the ~70 kernels of an eager step. Each step
copies its row indices and their count into the buffer the graph reads. The noise's generator is
registered with the graph, so each replay draws new noise (the generator's Philox offset moves on by the
graph's draws at every replay); before capturing, a small graph that only draws from it is replayed twice
to see that the draws differ. A capture that fails, or noise that would repeat, leaves the graph off:
that step and the rest run unpadded and eager, and the reason is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from paitient.services.jobs.persample import FastClipper, Forward, SampleLosses, Unsupported, exact_clipped_sum

SIGMAS = 5.0
"""The capacity's margin over the expected batch size, in standard deviations of the sample size."""
WARMUP = 3
"""Padded steps run eagerly before the step is captured."""

Step = Callable[[torch.Tensor], None]
"""One DP-SGD step on the rows given (sorted row indices, on the CPU)."""


def capacity(n: int, rate: float, sigmas: float = SIGMAS) -> int:
    """Rows a padded step holds: the expected sample size ``n * rate`` plus ``sigmas`` standard deviations
    of the Binomial(n, rate) size, rounded up to a multiple of 8, at most ``n``."""
    if rate >= 1:
        return n
    mean = n * rate
    rows = math.ceil(mean + sigmas * math.sqrt(mean * (1 - rate)))
    return max(1, min(n, -(-rows // 8) * 8))


def slots(rows: torch.Tensor, capacity: int) -> torch.Tensor:
    """The buffer a padded step reads: ``capacity`` row indices (the rows, then zeros) and then their count."""
    if len(rows) > capacity:
        raise ValueError(f"{len(rows)} rows do not fit a step of {capacity}")
    out = torch.zeros(capacity + 1, dtype=torch.long)
    out[: len(rows)] = rows
    out[-1] = len(rows)
    return out


class PaddedStep:
    """A DP-SGD step whose shapes do not depend on the sample: :meth:`load` the rows, then :meth:`run`.

    Everything it reads and writes is made here once and kept (the parameters ``leaves``, the ``noise``
    buffer of which ``views`` are the parameters' parts, ``loss_sum``), so the same work can be captured
    and replayed. ``fast`` is the book-keeping clipper, or None for the exact way; it becomes None when the
    fast way refuses the step (that step then takes the exact way).
    """

    def __init__(
        self,
        forward: Forward,
        sample_losses: SampleLosses,
        leaves: dict[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        capacity: int,
        max_grad_norm: float,
        scale: float,
        noise_std: float,
        noise: torch.Tensor,
        views: dict[str, torch.Tensor],
        noise_gen: torch.Generator,
        loss_sum: torch.Tensor,
        fast: FastClipper | None,
    ):
        self.forward, self.sample_losses = forward, sample_losses
        self.leaves, self.optimizer, self.x, self.y = leaves, optimizer, x, y
        self.capacity = capacity
        self.max_grad_norm, self.scale, self.noise_std = max_grad_norm, scale, noise_std
        self.noise, self.views, self.noise_gen, self.loss_sum = noise, views, noise_gen, loss_sum
        self.fast = fast
        self.slots = torch.zeros(capacity + 1, dtype=torch.long, device=x.device)
        self._positions = torch.arange(capacity, device=x.device)

    def load(self, rows: torch.Tensor) -> None:
        """The step's rows (at most :attr:`capacity`) into the buffer :meth:`run` reads; to a GPU from pinned
        memory without waiting (the host's caching allocator keeps that memory until the copy is done)."""
        host = slots(rows, self.capacity)
        if self.slots.device.type == "cuda":
            self.slots.copy_(host.pin_memory(), non_blocking=True)
        else:
            self.slots.copy_(host)

    def run(self) -> None:
        """The step on the loaded rows: noise, the clipped sum of the rows weighted 1 (padding 0) scaled and
        added to it, the optimiser's update. No value is read back to the host."""
        rows, count = self.slots[:-1], self.slots[-1]
        mask = (self._positions < count).to(self.noise.dtype)
        xb, yb = self.x.index_select(0, rows), self.y.index_select(0, rows)
        if self.noise_std > 0:
            self.noise.normal_(0.0, self.noise_std, generator=self.noise_gen)
        else:
            self.noise.zero_()
        c, scale = self.max_grad_norm, self.scale
        losses: torch.Tensor | None = None
        if self.fast is not None:
            try:
                _, _, losses = self.fast.clipped_sum(self.leaves, xb, yb, c, scale=scale, into=self.views, weights=mask)
            except Unsupported:  # refused before adding anything: the exact way, now and from now on
                self.fast = None
        if losses is None:
            _, _, losses = exact_clipped_sum(
                self.forward, self.sample_losses, self.leaves, xb, yb, c, scale=scale, into=self.views, weights=mask
            )
        self.loss_sum.add_((losses.detach().double() * mask).sum())
        for k, leaf in self.leaves.items():
            leaf.grad = self.views[k]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, rows: torch.Tensor) -> None:
        self.load(rows)
        self.run()


class Stepper:
    """Each step's rows to ``padded``, or to ``unpadded`` when they do not fit; with ``capture``, the padded
    step as a CUDA graph.

    Called with each step's rows: a sample over the capacity goes to ``unpadded`` (counted in
    :attr:`overflow`). Without ``capture`` the others run the padded step. With it, the first ``warmup``
    others run the padded step eagerly on a side stream; then the step is captured and replayed from there
    on. When the capture fails, that step and all later ones go to ``unpadded`` and :attr:`failed` says
    why. The three device-specific parts are :meth:`_warm`, :meth:`_capture` and :meth:`_replay`.
    """

    def __init__(
        self,
        padded: PaddedStep,
        unpadded: Step,
        *,
        capture: bool,
        generators: tuple[torch.Generator, ...] = (),
        warmup: int = WARMUP,
    ):
        self.padded, self.unpadded, self.capture, self.generators = padded, unpadded, capture, generators
        self.warmup = warmup
        self.warmed = 0
        self.overflow = 0
        self.replays = 0
        self.failed = ""
        self.graph: Any = None
        self.stream: Any = None

    @property
    def captured(self) -> bool:
        """Whether the step was captured and its graph replayed at least once."""
        return self.graph is not None and self.replays > 0

    def __call__(self, rows: torch.Tensor) -> None:
        if self.failed:
            self.unpadded(rows)
            return
        if len(rows) > self.padded.capacity:
            self.overflow += 1
            self.unpadded(rows)
            return
        if not self.capture:
            self.padded(rows)
            return
        if self.graph is None and self.warmed < self.warmup:
            self._warm(rows)
            self.warmed += 1
            return
        if self.graph is None:
            try:
                self.graph = self._capture()
            except Exception as e:  # noqa: BLE001 - any failure leaves the graph off; the run goes on eagerly
                self.failed = f"{type(e).__name__}: {e}"[:500] or type(e).__name__
                self.unpadded(rows)
                return
        self._replay(rows)
        self.replays += 1

    def _warm(self, rows: torch.Tensor) -> None:
        """One padded step, eagerly, on the stream the capture will use."""
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=self.padded.slots.device)
        here = torch.cuda.current_stream(self.padded.slots.device)
        self.stream.wait_stream(here)
        with torch.cuda.stream(self.stream):
            self.padded(rows)
        here.wait_stream(self.stream)

    def _capture(self) -> Any:
        """The padded step's work recorded as a graph (nothing runs); the noise's freshness checked first."""
        device = self.padded.slots.device
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=device)
        for generator in self.generators:
            if not fresh_noise(generator, self.stream):
                raise RuntimeError("a graph drawing from the noise's generator drew the same numbers twice")
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            graph.register_generator_state(generator)
        entry = torch.cuda.current_stream(device)
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                self.padded.run()
        except BaseException:
            torch.cuda.set_stream(entry)  # a capture that fails to end leaves its stream current
            raise
        return graph

    def _replay(self, rows: torch.Tensor) -> None:
        self.padded.load(rows)
        self.graph.replay()


def fresh_noise(generator: torch.Generator, stream: Any) -> bool:
    """Whether a graph that draws normal numbers from ``generator`` draws other ones at its next replay.

    The draws advance ``generator``, as any step's do; the step's noise stays fresh either way."""
    buffer = torch.empty(1024, device=generator.device)
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(generator)
    entry = torch.cuda.current_stream(generator.device)
    try:
        with torch.cuda.graph(graph, stream=stream):
            buffer.normal_(generator=generator)
    except BaseException:
        torch.cuda.set_stream(entry)
        raise
    graph.replay()
    first = buffer.clone()
    graph.replay()
    return not torch.equal(first, buffer)
