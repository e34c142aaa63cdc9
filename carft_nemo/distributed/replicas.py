"""Rows over the replicas of a worker group, and back (the one way the controller splits work).

A *replica* is what serves one contiguous part of a batch: a data-parallel copy of a model
(TP x PP ranks, every rank of it gets the same part) or one reward worker. Rows are
``[B, ...]`` tensors in a dict, or plain sequences (prompts, completions, examples).
Megatron-free: the controller uses it without loading a model library.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from carft_nemo.distributed.layout import ParallelLayout

Rows = Mapping[str, torch.Tensor] | Sequence[Any]


def part_sizes(total: int, parts: int, *, even: bool = False) -> list[int]:
    """Sizes of ``parts`` contiguous parts of ``total`` rows, the first ones one larger when uneven.

    ``even``: a :class:`ValueError` unless ``parts`` divides ``total`` (data-parallel model
    replicas must see equal shares: their collectives and mini-batches assume it).
    """
    if parts < 1:
        raise ValueError(f"cannot split rows into {parts} parts")
    if even and total % parts:
        raise ValueError(f"{total} rows cannot be split evenly over {parts} data-parallel replicas")
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def num_rows(rows: Rows) -> int:
    """``B`` of a dict of ``[B, ...]`` tensors (which must agree) or of a sequence."""
    if isinstance(rows, Mapping):
        sizes = {v.shape[0] for v in rows.values()}
        if len(sizes) != 1:
            raise ValueError(f"batch tensors disagree on the batch dimension: {sorted(sizes)}")
        return sizes.pop()
    return len(rows)


def split_rows(rows: Rows, parts: int, *, even: bool = False) -> list[Rows]:
    """``rows`` cut into ``parts`` contiguous parts (see :func:`part_sizes`), in order."""
    bounds, start = [], 0
    for size in part_sizes(num_rows(rows), parts, even=even):
        bounds.append((start, start + size))
        start += size
    if isinstance(rows, Mapping):
        return [{k: v[lo:hi] for k, v in rows.items()} for lo, hi in bounds]
    return [list(rows[lo:hi]) for lo, hi in bounds]


def concat_rows(parts: Sequence[Rows]) -> Rows:
    """Inverse of :func:`split_rows`: dicts of tensors concatenated key by key, sequences joined."""
    if parts and isinstance(parts[0], Mapping):
        return {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}
    return [row for part in parts for row in part]


@dataclass(frozen=True)
class ReplicaMap:
    """Which replica every rank of a group serves, and which rank answers for each replica."""

    data_parallel: int
    rank_dp: tuple[int, ...]  # replica of every global rank
    answering: tuple[int, ...]  # per replica: the global rank whose result is kept

    @classmethod
    def from_layouts(cls, layouts: Sequence[ParallelLayout]) -> ReplicaMap:
        """A model group: ranks of a data-parallel replica share its part; its last stage's TP rank 0 answers."""
        dp = layouts[0].data_parallel
        answering = [-1] * dp
        for lay in layouts:
            if lay.is_last_stage and lay.tp_rank == 0:
                answering[lay.dp_rank] = lay.rank
        return cls(dp, tuple(lay.dp_rank for lay in layouts), tuple(answering))

    @classmethod
    def for_generation(cls, layouts: Sequence[ParallelLayout]) -> ReplicaMap:
        """A model group as generation sees it: each data x context-parallel position is a replica.

        Context-parallel ranks hold full weights and generate whole sequences (the K/V cache
        path), so they serve prompts of their own (NeMo-RL generates with CP 1 too); without
        context parallelism this is :meth:`from_layouts`.
        """
        replicas = layouts[0].data_parallel * layouts[0].context_parallel
        answering = [-1] * replicas
        for lay in layouts:
            if lay.is_last_stage and lay.tp_rank == 0:
                answering[lay.generation_replica] = lay.rank
        return cls(replicas, tuple(lay.generation_replica for lay in layouts), tuple(answering))

    @classmethod
    def independent(cls, num_workers: int) -> ReplicaMap:
        """Workers without a process group (the reward pool): each is its own replica."""
        ranks = tuple(range(num_workers))
        return cls(num_workers, ranks, ranks)

    def per_rank(self, shards: Sequence[Any]) -> list[Any]:
        """Spread per-replica items over all ranks (every rank gets its replica's item)."""
        if len(shards) != self.data_parallel:
            raise ValueError(f"{len(shards)} shards for {self.data_parallel} data-parallel replicas")
        return [shards[d] for d in self.rank_dp]

    def answers(self, results: Sequence[Any]) -> list[Any]:
        """The answering rank's result of each replica, in replica order."""
        return [results[r] for r in self.answering]


__all__ = ["ReplicaMap", "Rows", "concat_rows", "num_rows", "part_sizes", "split_rows"]
