"""Sequence packing: the rows of a micro-batch packed into bins of a token budget (pure tensor code).

A micro-batch of right-padded rows ``tokens [b, S]`` with real lengths ``L_i`` costs the model
``b * S`` token positions; packed, it costs ``n_bins * budget`` with ``n_bins`` as small as
first-fit decreasing gets it (each bin holds whole rows, ``sum L_i <= budget``). Inside a bin
every row keeps its own positions (``0 .. L_i - 1``) and attends only to itself, causally
(:func:`carft_nemo.models.forward.packed_inputs`), so the model's per-token outputs equal the
unpacked ones. They are unpacked back to ``[b, S, ...]`` before any loss sees them
(:func:`unpack`), so every loss (SFT, PPO, values, CARFT's pooling over a row's CoT) is
unchanged, and the rows keep their micro-batch (losses that look across rows, like
CARFT's negatives, see the same rows). Where the padding goes: the model stops computing it;
unpacked outputs hold zeros past each row's length.

The packed tensors travel in the micro-batch as extra keys (``packed_tokens``,
``packed_positions``, ``packed_segments``, ``unpack_index``), so the batch stays a mapping of
tensors. With pipeline parallelism every micro-batch must have the same shape on the wire:
``min_bins`` pads with empty bins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from carft_nemo.config import require


@dataclass
class PackingConfig:
    """``packing`` of a model role (SFT, actor, critic, reference): rows packed into bins for the model.

    Attributes:
        enabled: pack every training and scoring micro-batch.
        max_tokens: tokens per bin; 0 = each micro-batch's width (its longest row). A row longer
            than the budget is an error naming this key.

    Without Transformer Engine (CPU, tests) the bins run as rows with a block-diagonal causal
    mask and per-token RoPE positions; with it, as TE's THD stream (the bins back to back, each
    sequence marked by ``cu_seqlens``: :func:`carft_nemo.models.forward.thd_sequences`), which
    TE's fused attention and megatron's RoPE restart at every sequence. TE with context
    parallelism is refused (its THD split of each sequence over the ranks is not wired).
    """

    enabled: bool = False
    max_tokens: int = 0

    def __post_init__(self) -> None:
        require(self.max_tokens >= 0, "max_tokens", f"must be >= 0, got {self.max_tokens}")


def check_budget(packing: PackingConfig, longest_row: int, where: str) -> None:
    """At start-up: a bin budget below the longest possible row would fail mid-run; name the key."""
    if packing.enabled and packing.max_tokens:
        require(
            packing.max_tokens >= longest_row,
            "packing.max_tokens",
            f"{packing.max_tokens} is below the longest row this run can produce ({longest_row} tokens: {where})",
        )


PAD_SEGMENT = -1  # segment id of a bin's unused tail


def first_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Row indices per bin: longest row first, each into the first bin with room (Johnson 1973: <= 11/9 OPT + 1)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for row in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[row]
        if n > budget:
            raise ValueError(f"row {row} has {n} tokens, more than the packing budget of {budget} (packing.max_tokens)")
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(row)
                room[b] -= n
                break
        else:
            bins.append([row])
            room.append(budget - n)
    return bins


def row_lengths(micro: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Real tokens per row: ``lengths`` when the batch has it, else from the PPO ``action_mask [b, S-1]``.

    (column j of the action mask is token j + 1, so a row ends after its last action + 1.)
    """
    if "lengths" in micro:
        return micro["lengths"].long()
    if "action_mask" in micro:
        mask = micro["action_mask"].bool()
        cols = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask, cols, torch.full_like(cols, -1)).max(dim=1).values
        return torch.where(last >= 0, last + 2, torch.ones_like(last))
    raise KeyError("packing needs the rows' lengths: a 'lengths' or 'action_mask' entry in the batch")


def plan(lengths: torch.Tensor, budget: int, multiple: int = 1) -> tuple[int, list[list[int]]]:
    """The bin budget rounded up to ``multiple`` (what TP sequence parallelism and CP need) and
    the rows of each bin (:func:`first_fit_decreasing`)."""
    require(budget >= 1, "packing.max_tokens", f"must be >= 1, got {budget}")
    budget = -(-budget // multiple) * multiple
    return budget, first_fit_decreasing([int(n) for n in lengths.tolist()], budget)


def pack(
    tokens: torch.Tensor, lengths: torch.Tensor, budget: int, bins: list[list[int]], *, min_bins: int = 0
) -> dict[str, torch.Tensor]:
    """The packed tensors of one micro-batch, by its :func:`plan`.

    ``tokens [b, S]``, ``lengths [b]`` -> ``packed_tokens / packed_positions / packed_segments
    [n_bins, budget]`` (segment = the row's index in the micro-batch, ``PAD_SEGMENT`` on a bin's
    tail) and ``unpack_index [b, S]``: for each row position, its flat index in the packed
    ``[n_bins * budget]`` tokens, or ``n_bins * budget`` past the row's length (a zero row).
    """
    b, width = tokens.shape
    n_bins = max(len(bins), min_bins, 1)
    packed = torch.zeros(n_bins, budget, dtype=tokens.dtype, device=tokens.device)
    positions = torch.zeros(n_bins, budget, dtype=torch.long, device=tokens.device)
    segments = torch.full((n_bins, budget), PAD_SEGMENT, dtype=torch.long, device=tokens.device)
    index = torch.full((b, width), n_bins * budget, dtype=torch.long, device=tokens.device)
    for bin_id, rows in enumerate(bins):
        offset = 0
        for row in rows:
            n = int(lengths[row])
            packed[bin_id, offset : offset + n] = tokens[row, :n]
            positions[bin_id, offset : offset + n] = torch.arange(n, device=tokens.device)
            segments[bin_id, offset : offset + n] = row
            index[row, :n] = bin_id * budget + offset + torch.arange(n, device=tokens.device)
            offset += n
    return {"packed_tokens": packed, "packed_positions": positions, "packed_segments": segments, "unpack_index": index}


def unpack(packed: torch.Tensor, unpack_index: torch.Tensor) -> torch.Tensor:
    """Per-token outputs ``[n_bins, budget, ...]`` back to the rows ``[b, S, ...]`` (zeros past each length).

    A gather, so gradients flow back to the packed computation.
    """
    flat = packed.reshape(-1, *packed.shape[2:])
    flat = torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])
    b, width = unpack_index.shape
    return flat.index_select(0, unpack_index.reshape(-1)).reshape(b, width, *packed.shape[2:])


__all__ = [
    "PackingConfig",
    "PAD_SEGMENT",
    "check_budget",
    "first_fit_decreasing",
    "pack",
    "plan",
    "row_lengths",
    "unpack",
]
