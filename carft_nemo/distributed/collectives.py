"""The few differentiable collectives the CARFT contrastive signal needs.

Every function takes an explicit ``group``; ``group=None`` (or torch.distributed not
initialised, or a group of one rank) means "no distribution": the function is the
identity on its input, so algorithm code calls the same function with and without
parallelism and unit tests need no process group.

Gradient conventions (the reason this module exists):

* :func:`all_gather_with_grad` (data-parallel): rank ``r`` contributes rows ``x_r`` and
  receives ``X = concat_r x_r``. Each rank may use ``X`` in a *different* local loss
  ``L_r``; the total objective is ``sum_r L_r``, so ``d(sum_q L_q)/dx_r = sum_q
  (dL_q/dX)[rows of r]``: backward all-reduces (sums) the gradient of ``X`` and keeps the
  own rows. (Gloo has no reduce-scatter, so it is an all-reduce then a slice.)
* :func:`sum_over_shards` (sequence / context parallel): rank ``r`` holds a partial sum
  ``p_r`` of a quantity over its sequence shard; every rank receives ``P = sum_r p_r`` and
  computes the *same* downstream loss ``L(P)`` (replicated, as megatron does for TP).
  Then ``dL/dp_r = dL/dP``: backward is the identity (megatron's
  ``reduce_from_tensor_model_parallel_region`` convention). The parameter gradients of
  each shard are partial; megatron sums them across the group (``sequence_parallel``
  attribute for TP-SP, the data-parallel-with-context-parallel gradient reduction for CP).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather_with_grad",
    "all_gather_no_grad",
    "all_reduce_max_no_grad",
    "all_reduce_sum_no_grad",
    "group_size",
    "sum_over_shards",
]


def group_size(group: dist.ProcessGroup | None) -> int:
    """Ranks in ``group``; 1 when ``group`` is None or torch.distributed is not initialised."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _gather_padded(x: Tensor, group: dist.ProcessGroup) -> tuple[Tensor, list[int]]:
    """All-gather along dim 0 allowing a different number of rows per rank.

    Returns the concatenation (rank order) and the per-rank row counts.
    """
    world = dist.get_world_size(group)
    rows = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    all_rows = [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(all_rows, rows, group=group)
    counts = [int(r.item()) for r in all_rows]
    width = max(counts)
    padded = x.new_zeros((width, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0), counts


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        gathered, counts = _gather_padded(x, group)
        rank = dist.get_rank(group)
        ctx.group = group
        ctx.start = sum(counts[:rank])
        ctx.rows = counts[rank]
        return gathered

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        # Sum over ranks: every rank's loss may depend on every rank's rows.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start : ctx.start + ctx.rows], None


def all_gather_with_grad(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """``concat_r x_r`` along dim 0 over ``group``; gradient flows back to each rank's rows.

    Forward: ``X = [x_0; x_1; ...; x_{W-1}]`` (ranks may hold different row counts).
    Backward: ``dx_r = (sum_q dL_q/dX)[rows of r]``. All ranks must call backward
    (it is a collective) whenever any rank does.
    """
    if group_size(group) == 1:
        return x
    return _AllGatherWithGrad.apply(x, group)


def all_gather_no_grad(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """``concat_r x_r`` along dim 0 over ``group``, detached (flags, counts, paper-style gather)."""
    if group_size(group) == 1:
        return x.detach()
    with torch.no_grad():
        return _gather_padded(x.detach(), group)[0]


class _SumOverShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        out = x.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        # The downstream loss is replicated on every rank of the group: dL/dp_r = dL/dP.
        return grad, None


def sum_over_shards(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """``P = sum_r x_r`` over ``group`` (same shape on all ranks); backward is the identity.

    Use for per-shard partial sums of a sequence- or context-parallel group when every
    rank then computes the same loss from ``P`` (see the module docstring).
    """
    if group_size(group) == 1:
        return x
    return _SumOverShards.apply(x, group)


def all_reduce_max_no_grad(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Element-wise maximum over ``group``, detached (softmax stabiliser)."""
    out = x.detach().clone()
    if group_size(group) > 1:
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


def all_reduce_sum_no_grad(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Element-wise sum over ``group``, detached (counts and logged metrics)."""
    out = x.detach().clone()
    if group_size(group) > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out
