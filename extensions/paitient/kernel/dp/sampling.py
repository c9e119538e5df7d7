"""Poisson sampling: each step takes every row independently with probability q (empty batches happen).

Opacus draws one uniform number per row and step. For a dataset whose rows can be fetched as a batch
(a ``TensorDataset``) paitient draws the *gaps* between the chosen rows instead: in a sequence of
independent Bernoulli(q) trials the gaps between successes are independent Geometric(q) variables, so
the cumulative sums of geometric draws are exactly a Poisson sample, at a cost that grows with the
batch, not with the dataset. An empty draw yields tensors with zero rows, which the private optimizer
handles (that step's gradient is the noise alone, and the step counts).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset


class PoissonSampler(Sampler[torch.Tensor]):
    """Yields ``steps`` index tensors, each row in each independently with probability ``sample_rate``."""

    def __init__(self, num_rows: int, sample_rate: float, steps: int, generator: torch.Generator | None = None):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
        self.num_rows = num_rows
        self.sample_rate = sample_rate
        self.steps = steps
        self.generator = generator

    def __len__(self) -> int:
        return self.steps

    def draw(self) -> torch.Tensor:
        """One step's row indices, sorted, each row in with probability ``sample_rate``."""
        n, q = self.num_rows, self.sample_rate
        if q == 1.0:
            return torch.arange(n)
        mean = n * q
        chunk = max(16, int(mean + 6 * math.sqrt(mean) + 16))
        pieces, end = [], 0
        while end < n:
            gaps = torch.empty(chunk, dtype=torch.float64).geometric_(q, generator=self.generator)
            pos = gaps.cumsum(0).add_(end - 1).to(torch.int64)
            pieces.append(pos)
            end = int(pos[-1]) + 1
        idx = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        return idx[idx < n]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for _ in range(self.steps):
            yield self.draw()


def _fetch(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    """The batch as the dataset's indexing returned it (one tensor per column): nothing to collate."""
    return batch


def poisson_loader(
    data_loader: DataLoader[Any], generator: torch.Generator | None = None
) -> DataLoader[tuple[torch.Tensor, ...]] | None:
    """A Poisson-sampling loader over ``data_loader``'s dataset with one step per original batch.

    Only for a ``TensorDataset`` (rows fetched by one indexing operation); ``None`` otherwise, and the
    caller falls back to Opacus' ``DPDataLoader``.
    """
    dataset = data_loader.dataset
    if type(dataset) is not TensorDataset:
        return None
    steps = len(data_loader)
    sampler = PoissonSampler(len(dataset), 1 / steps, steps, generator=generator)
    return DataLoader(
        dataset, sampler=sampler, batch_size=None, collate_fn=_fetch, num_workers=0, pin_memory=data_loader.pin_memory
    )
