"""Embedding-enhanced partial reward (my_cl_trainer_v11).

For a wrong answer that could still be extracted (ReFT's partial-reward case):

    r_i = scale * cos(z_ann_i, z_gen_i) + offset        (defaults 0.1, 0.2: r in [0.1, 0.3])

computed without gradient from the rollout-time embeddings; every other reward is kept.
Differences from the paper code: it overwrites rewards equal to 0.1 (ReFT's partial
value); here the caller passes the mask of wrong-but-extractable samples explicitly, and
an empty CoT on either side gives cos = 0 (reward = offset).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from carft_nemo.algorithms.contrastive.config import ContrastiveConfig

__all__ = ["embedding_partial_reward"]


@torch.no_grad()
def embedding_partial_reward(
    cfg: ContrastiveConfig, z_ann: Tensor, z_gen: Tensor, rewards: Tensor, wrong_extractable: Tensor
) -> Tensor:
    """Rewards ``[b]`` with wrong-but-extractable entries replaced by ``scale * cos + offset``.

    ``z_ann``, ``z_gen``: ``[b, d]`` pooled CoT embeddings; returns ``rewards`` unchanged
    (a copy) when ``cfg.partial_reward`` is off.
    """
    rewards = rewards.detach().clone()
    if not cfg.partial_reward:
        return rewards
    cos = F.cosine_similarity(z_ann.detach().float(), z_gen.detach().float(), dim=-1, eps=1e-8)
    shaped = (cfg.partial_reward_scale * cos + cfg.partial_reward_offset).to(rewards.dtype)
    return torch.where(wrong_extractable.bool(), shaped, rewards)
