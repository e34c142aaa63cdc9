"""Context-parallel attention without Transformer Engine (CPU, tests): exact causal attention over
the context-parallel group's all-gathered keys and values.

With context parallelism of size C, every sequence is cut into 2C chunks and rank r holds
chunks r and 2C-1-r (megatron's load-balanced layout: :func:`split_for_context_parallel`), so
TE's attention drops in unchanged on GPUs. megatron's local ``DotProductAttention`` asserts
C == 1; this core, registered in its place through the layer spec, all-gathers K and V over
the group (:func:`carft_nemo.distributed.collectives.all_gather_with_grad`: the backward sums
every rank's gradient for a rank's keys, since every rank's queries read them) and masks by
the tokens' *global* positions:

    hidden(q, k) = pos(k) > pos(q)

so each query sees exactly the keys it sees without context parallelism. Packed rows
(:mod:`carft_nemo.data.packing`) bring their whole-bin mask, which it reads at the same
positions. Memory per rank is
the full K/V of its micro-batch (what ring attention avoids on GPUs; fine for CPU tests and
moderate lengths), compute is the rank's queries against all keys.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention

from carft_nemo.distributed import axes
from carft_nemo.distributed.collectives import all_gather_with_grad


def chunk_positions(local_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions ``[local_len]`` of rank ``cp_rank``'s tokens (chunks r and 2C-1-r)."""
    chunk = local_len // 2
    first = torch.arange(chunk, device=device) + cp_rank * chunk
    second = torch.arange(chunk, device=device) + (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([first, second])


def split_for_context_parallel(t: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """Rank ``cp_rank``'s chunks r and 2C-1-r of ``t`` along ``dim`` (its length divides by 2C)."""
    if cp_size == 1:
        return t
    length = t.shape[dim]
    if length % (2 * cp_size):
        raise ValueError(f"a length of {length} does not split into 2 x context_parallel={cp_size} chunks")
    chunks = t.chunk(2 * cp_size, dim=dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=dim)


def gather_from_context_parallel(t: torch.Tensor, cp_size: int, group, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`split_for_context_parallel` over the group: the whole sequence, in order.

    For per-token outputs without gradient (log-probs, values, CARFT projections of a forward
    call); the loss path never gathers (each rank scores its own tokens).
    """
    if cp_size == 1:
        return t
    shares = [torch.empty_like(t) for _ in range(cp_size)]
    torch.distributed.all_gather(shares, t.contiguous(), group=group)
    halves = [share.chunk(2, dim=dim) for share in shares]
    ordered = [halves[r][0] for r in range(cp_size)] + [halves[r][1] for r in reversed(range(cp_size))]
    return torch.cat(ordered, dim=dim)


class ContextParallelAttention(DotProductAttention):
    """megatron's local core attention, with the keys and values of the whole context-parallel group."""

    def __init__(self, config, *args, **kwargs):
        cp = config.context_parallel_size
        config.context_parallel_size = 1  # the parent refuses C > 1; it keeps a reference to config
        try:
            super().__init__(config, *args, **kwargs)
        finally:
            config.context_parallel_size = cp

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):  # fmt: skip
        group = axes.group("cp")
        cp_size, cp_rank = axes.size("cp"), axes.rank("cp")
        local = query.shape[0]
        q_pos = chunk_positions(local, cp_size, cp_rank, query.device)
        k_pos = torch.cat([chunk_positions(local, cp_size, r, query.device) for r in range(cp_size)])
        # [s, b, g, d] -> gathered along the sequence in rank order (the positions above follow it)
        key = all_gather_with_grad(key.contiguous(), group)
        value = all_gather_with_grad(value.contiguous(), group)
        if attention_mask is not None and attention_mask.shape[-1] == cp_size * local:
            # a whole-sequence mask (packed rows: causal within each row of a bin), at this rank's
            # queries and the gathered keys
            hidden = attention_mask[:, :, q_pos][..., k_pos]
        else:
            hidden = (k_pos[None, :] > q_pos[:, None]).view(1, 1, local, -1)
        return super().forward(query, key, value, hidden, attn_mask_type, attention_bias, packed_seq_params)
