"""Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-like Training: A Critical Perspective").

For a question q with G sampled responses o_1..o_G and scalar rewards R_i, Dr.GRPO drops
both normalisations of GRPO that bias the update:

    (1) A_i = R_i - mean_{j in group(q)} R_j             (no division by the group std)
    (2) L   = (1 / (N * T_max)) * sum_i sum_t m_{i,t} * max(-A_i rho_{i,t},
                                                          -A_i clip(rho_{i,t}, 1 - eps, 1 + eps))

with N the number of samples in the batch and T_max the generation budget (maximum response
tokens). GRPO instead averages each sequence's tokens over its own length |o_i|, which
shrinks the per-token weight of long responses (so long wrong answers are penalised less);
the constant N * T_max gives every token the same weight 1 / (N * T_max).

The surrogate in (2) is exactly PPO's clipped objective with the advantage broadcast over the
response tokens, so the policy loss is
``ppo.clipped_policy_loss(logp, old_logp, token_advantages(A, mask), mask)[0] /
drgrpo_normalizer(N, T_max)`` -- this module deliberately has no surrogate of its own.
There is no critic and no value loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["drgrpo_normalizer", "group_advantages", "token_advantages"]


def group_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Equation (1): ``A_i = R_i - mean`` of the rewards of ``i``'s group, no std division.

    ``rewards [N]`` with ``N = num_questions * group_size`` and the rows of one question
    contiguous (row ``i`` is in group ``i // group_size``). Raises ``ValueError`` naming the
    sizes when ``N`` is not a multiple of ``group_size``.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    n = rewards.shape[0]
    if group_size <= 0 or n % group_size != 0:
        raise ValueError(f"group_size={group_size} does not divide the number of rewards N={n}")
    grouped = rewards.reshape(n // group_size, group_size)
    return (grouped - grouped.mean(dim=1, keepdim=True)).reshape(n)


def token_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """Broadcast sequence advantages ``[B]`` over the response tokens: ``[B, T]``, 0 off mask."""
    return torch.where(
        mask, advantages[:, None].expand(mask.shape), torch.zeros((), dtype=advantages.dtype, device=advantages.device)
    )


def drgrpo_normalizer(num_samples: int, max_response_tokens: int) -> float:
    """The constant ``N * T_max`` of equation (2): sample count times the generation budget.

    Dividing the summed surrogate by it (instead of by each response's own length) is what
    removes GRPO's length bias.
    """
    if num_samples <= 0 or max_response_tokens <= 0:
        raise ValueError(
            f"num_samples={num_samples} and max_response_tokens={max_response_tokens} must both be positive"
        )
    return float(num_samples * max_response_tokens)
