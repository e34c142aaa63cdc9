"""Deterministic, resumable order of training examples.

Step k's global batch is a pure function of (seed, dataset size, global batch size, k):
each epoch is a fresh permutation drawn from ``derive_seed(seed, "data_order", epoch)``. Resuming
therefore needs only the number of completed steps, and every data-parallel rank can
compute its own slice without communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from carft_nemo.seeding import derive_seed


@dataclass(frozen=True)
class BatchSchedule:
    dataset_size: int
    global_batch_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dataset_size < 1:
            raise ValueError("BatchSchedule: the dataset is empty")
        if self.global_batch_size < 1:
            raise ValueError("BatchSchedule: global_batch_size must be >= 1")

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "data_order", epoch))
        return torch.randperm(self.dataset_size, generator=gen)

    def global_indices(self, step: int) -> list[int]:
        """Dataset indices of the global batch of ``step`` (0-based), wrapping across epochs."""
        start = step * self.global_batch_size
        out: list[int] = []
        while len(out) < self.global_batch_size:
            epoch, offset = divmod(start + len(out), self.dataset_size)
            order = self._epoch_order(epoch)
            take = min(self.global_batch_size - len(out), self.dataset_size - offset)
            out.extend(order[offset : offset + take].tolist())
        return out

    def rank_indices(self, step: int, dp_rank: int, dp_size: int) -> list[int]:
        """This data-parallel rank's contiguous share of the global batch."""
        if self.global_batch_size % dp_size:
            raise ValueError(f"global batch {self.global_batch_size} not divisible by data parallel size {dp_size}")
        per_rank = self.global_batch_size // dp_size
        return self.global_indices(step)[dp_rank * per_rank : (dp_rank + 1) * per_rank]

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch_size / self.dataset_size
