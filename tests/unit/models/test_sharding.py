"""Strided tensor-parallel slicing (SwiGLU fc1 is [gate; up], each split separately)."""

from __future__ import annotations

import pytest
import torch

from carft_nemo.models.sharding import tp_slice


def test_stride_two_gives_each_rank_its_gate_and_up_halves() -> None:
    gate, up = torch.arange(8.0).view(4, 2), 100 + torch.arange(8.0).view(4, 2)  # full fc1 = [gate; up]
    full = torch.cat([gate, up])
    rank0, rank1 = (tp_slice(full, 0, 2, r, 2) for r in (0, 1))
    assert torch.equal(rank0, torch.cat([gate[:2], up[:2]]))
    assert torch.equal(rank1, torch.cat([gate[2:], up[2:]]))
    # a plain chunk would have put the whole gate on rank 0
    assert not torch.equal(rank0, full.chunk(2)[0])


def test_row_parallel_and_reassembly() -> None:
    full = torch.randn(3, 8)
    shards = [tp_slice(full, 1, 1, r, 4) for r in range(4)]
    assert all(s.shape == (3, 2) for s in shards)
    assert torch.equal(torch.cat(shards, dim=1), full)


def test_indivisible_dimension_is_reported() -> None:
    with pytest.raises(ValueError, match=r"dimension 0 of size 6 does not split into .*= 2\*2 pieces"):
        tp_slice(torch.zeros(6, 2), 0, 2, 0, 2)
