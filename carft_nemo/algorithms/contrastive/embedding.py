"""CoT embedding: value-weighted pooling of projected hidden states (CARFT eq. for z).

    z = sum_{t in CoT} softmax_t(V_t) * e_t,    e_t = W h_t  (ContrastiveHead)

over the positions selected by a mask (CoT tokens: no prompt, no padding), in megatron's
``[s, b, ...]`` layout. Works on sequence-sharded inputs (sequence or context parallel):
each rank holds a slice of ``s``; with the global masked maximum ``m`` of V (a constant
stabiliser: z does not depend on it), each rank forms the partial sums

    N_r = sum_{t in shard r} exp(V_t - m) e_t,    D_r = sum_{t in shard r} exp(V_t - m)

and ``z = (sum_r N_r) / (sum_r D_r)`` via :func:`~carft_nemo.distributed.collectives.sum_over_shards`
(backward identity: the loss built on z is replicated on every shard).

Differences from the paper code (``masked_softmax`` in my_cl_trainer_v4/v9): it fills
masked logits with the dtype minimum, so an empty mask yields a *uniform* softmax over all
positions (prompt and padding included) and relies on ``not_cot_mask`` forcing one token;
here an empty mask gives all-zero weights and ``z = 0`` (flagged by ``nonempty``), and
values in masked positions (even inf/nan) never reach the arithmetic or the gradient.
Pooling runs in float32 at least (bf16 hidden states are upcast).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from carft_nemo.distributed.collectives import all_reduce_max_no_grad, sum_over_shards

__all__ = ["PooledEmbedding", "masked_softmax", "pool_cot_embedding"]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def masked_softmax(logits: Tensor, mask: Tensor, dim: int = 0) -> Tensor:
    """``w_t = mask_t exp(x_t) / sum_u mask_u exp(x_u)`` along ``dim``; all zeros where the mask is empty.

    Stable for extreme finite logits (shifted by the masked maximum) and ignores whatever
    sits in masked positions (inf/nan included), in value and gradient.
    """
    mask = mask.bool()
    safe = torch.where(mask, logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    shift = safe.masked_fill(~mask, float("-inf")).amax(dim=dim, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift)).detach()
    exp = torch.where(mask, torch.exp(safe - shift), torch.zeros_like(safe))
    denom = exp.sum(dim=dim, keepdim=True)
    return exp / denom.clamp_min(torch.finfo(exp.dtype).tiny)


@dataclass(frozen=True)
class PooledEmbedding:
    """``z [b, d]`` pooled embeddings and ``nonempty [b]`` (bool): the mask selected >= 1 token."""

    z: Tensor
    nonempty: Tensor


def pool_cot_embedding(embeddings: Tensor, values: Tensor, mask: Tensor, seq_group=None) -> PooledEmbedding:
    """Value-softmax pooling ``z_b = sum_t softmax_t(V_{t,b}) e_{t,b}`` over ``mask``.

    Args:
        embeddings: ``[s, b, d]`` projected token states e_t (this rank's sequence shard).
        values: ``[s, b]`` value estimates V_t (gradient flows through the weights too).
        mask: ``[s, b]`` bool, True on the tokens to pool (CoT, or an LCS part of it).
        seq_group: process group over which ``s`` is sharded (sequence / context
            parallel); ``None`` = the full sequence is local.

    Returns:
        :class:`PooledEmbedding`, identical on every rank of ``seq_group``; ``z`` is 0
        where the (global) mask is empty.
    """
    if embeddings.dim() != 3 or values.shape != embeddings.shape[:2] or mask.shape != values.shape:
        raise ValueError(
            f"expected embeddings [s, b, d], values and mask [s, b]; got "
            f"{tuple(embeddings.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}"
        )
    dtype = _compute_dtype(embeddings, values)
    mask = mask.bool()
    values = values.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=values.device)
    safe = torch.where(mask, values, zero)
    local_max = safe.masked_fill(~mask, float("-inf")).amax(dim=0)  # [b]
    shift = all_reduce_max_no_grad(local_max, seq_group)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    weights = torch.where(mask, torch.exp(safe - shift), zero)  # [s, b], max entry is exactly 1
    emb = torch.where(mask[..., None], embeddings.to(dtype), zero)
    numer = torch.einsum("sb,sbd->bd", weights, emb)
    packed = sum_over_shards(torch.cat([numer, weights.sum(dim=0)[:, None]], dim=1), seq_group)
    numer, denom = packed[:, :-1], packed[:, -1]
    nonempty = denom.detach() > 0  # the maximal token contributes exp(0) = 1
    z = numer / torch.where(nonempty, denom, torch.ones_like(denom))[:, None]
    return PooledEmbedding(z=z, nonempty=nonempty)
