"""CARFT contrastive signals (arXiv 2508.15868): pure tensor code, collectives injected.

Entry points: :func:`contrastive_loss` (PPO micro-batch loss term), :func:`lcs_spans`
(LCS split of annotated vs on-policy CoTs), :func:`pool_cot_embedding` and
:func:`embedding_partial_reward` (rollout-time reward shaping), :class:`ContrastiveConfig`.
"""

from carft_nemo.algorithms.contrastive.config import ContrastiveConfig
from carft_nemo.algorithms.contrastive.embedding import PooledEmbedding, masked_softmax, pool_cot_embedding
from carft_nemo.algorithms.contrastive.loss import CoTBatch, LcsSpans, contrastive_loss, lcs_spans
from carft_nemo.algorithms.contrastive.partial_reward import embedding_partial_reward

__all__ = [
    "CoTBatch",
    "ContrastiveConfig",
    "LcsSpans",
    "PooledEmbedding",
    "contrastive_loss",
    "embedding_partial_reward",
    "lcs_spans",
    "masked_softmax",
    "pool_cot_embedding",
]
