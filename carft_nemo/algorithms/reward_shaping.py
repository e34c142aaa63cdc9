"""From the reward pool's per-sample rewards to the sequence scores RL optimises.

    r_i  = the ReFT reward (1 correct, 0.1 wrong but extractable, 0 none)
    r_i' = scale * cos(z_ann_i, z_gen_i) + offset   where i is wrong but extractable and the
                                                    CARFT partial reward is on (my_cl_trainer_v11)
    s_i  = r_i'                                     for a response that ended with EOS
         = unfinished_score                         for one cut at the length limit, when set

``r'`` is what runs report as ``reward``; ``s`` (``score``) goes into the KL-penalised token
rewards. Pure tensor code; the embeddings ``z`` come from the rollout-time forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from carft_nemo.algorithms.contrastive import ContrastiveConfig, embedding_partial_reward


@dataclass(frozen=True)
class PartialRewardTerm:
    """CARFT's embedding-enhanced partial reward for wrong-but-extractable samples."""

    config: ContrastiveConfig  # partial_reward_scale / partial_reward_offset
    z_annotated: Tensor  # [B, d] pooled annotated-CoT embeddings
    z_on_policy: Tensor  # [B, d] pooled on-policy CoT embeddings
    wrong_extractable: Tensor  # [B] bool


@dataclass(frozen=True)
class ShapedRewards:
    rewards: Tensor  # [B] r' (the partial reward applied)
    scores: Tensor  # [B] s (the unfinished score applied)
    partial_reward_mean: float | None  # mean r' over the wrong-but-extractable samples (None: none or off)


def unfinished_scores(scores: Tensor, finished: Tensor, unfinished_score: float | None) -> Tensor:
    """``s`` with every unfinished sample's score replaced by ``unfinished_score`` (a copy; None: unchanged)."""
    scores = scores.clone()
    if unfinished_score is None:
        return scores
    return torch.where(finished.bool(), scores, torch.full_like(scores, unfinished_score))


def shape_rewards(
    rewards: Tensor,
    finished: Tensor,
    *,
    unfinished_score: float | None = None,
    partial: PartialRewardTerm | None = None,
) -> ShapedRewards:
    """Apply the partial reward (when given), then the unfinished score (module docstring)."""
    mean = None
    if partial is not None:
        rewards = embedding_partial_reward(
            partial.config, partial.z_annotated, partial.z_on_policy, rewards, partial.wrong_extractable
        )
        if partial.config.partial_reward and partial.wrong_extractable.any():
            mean = float(rewards[partial.wrong_extractable.bool()].mean())
    return ShapedRewards(rewards, unfinished_scores(rewards, finished, unfinished_score), mean)


__all__ = ["PartialRewardTerm", "ShapedRewards", "shape_rewards", "unfinished_scores"]
