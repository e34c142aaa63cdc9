"""Turning one round of rollouts into training tensors (controller side, pure tensor code).

Shapes: ``B`` samples, ``S`` prompt+response positions, ``T = S - 1`` action columns
(column j is token j + 1 chosen after tokens[:j+1]; see :mod:`carft_nemo.algorithms.ppo`).
Values from a critic are "value after reading token t" ``[B, S]``; the value of the state
in which action column j is taken is therefore ``values[:, j]`` (= ``values[:, :-1]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from carft_nemo.algorithms.contrastive import lcs_spans, pool_cot_embedding
from carft_nemo.data.tokenization import EncodedExample, collate
from carft_nemo.generation.rollout import Rollout, RolloutBatch


def join_rollouts(parts: Sequence[Rollout]) -> Rollout:
    """Concatenate the rollouts of the data-parallel replicas, in replica order."""
    return Rollout(
        prompts=[p for r in parts for p in r.prompts],
        responses=[x for r in parts for x in r.responses],
        logprobs=[x for r in parts for x in r.logprobs],
        finished=[x for r in parts for x in r.finished],
    )


def action_mask(batch: RolloutBatch) -> torch.Tensor:
    """``[B, T]`` True where action column j is a response token."""
    return batch.response_mask[:, 1:]


@dataclass(frozen=True)
class AnnotatedBatch:
    """Prompt + annotated CoT (+ EOS) of each sample's question.

    ``tokens`` and ``cot_mask`` ``[B, Sa]``, ``lengths [B]``.
    """

    tokens: torch.Tensor
    cot_mask: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def build(cls, encoded: Sequence[EncodedExample], pad_id: int) -> AnnotatedBatch:
        batch = collate([e.tokens for e in encoded], pad_id, loss_masks=[e.loss_mask for e in encoded])
        return cls(batch["tokens"], batch["loss_mask"].bool(), batch["lengths"])


def lcs_split(annotated: AnnotatedBatch, rollout: RolloutBatch) -> dict[str, torch.Tensor]:
    """LCS membership of annotated vs on-policy CoT tokens (CARFT's negative signal), ``[B, .]``."""
    spans = lcs_spans(annotated.tokens.t(), annotated.cot_mask.t(), rollout.tokens.t(), rollout.response_mask.t())
    return {
        "ann_common": spans.annotated_common.t(),
        "gen_common": spans.on_policy_common.t(),
        "lcs_length": spans.length,
    }


def pooled_embeddings(embeddings: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """z ``[B, d]`` from ``[B, S, d]`` token embeddings, ``[B, S]`` values and mask (no gradient)."""
    with torch.no_grad():
        return pool_cot_embedding(embeddings.transpose(0, 1), values.t(), mask.t()).z


__all__ = ["AnnotatedBatch", "action_mask", "join_rollouts", "lcs_split", "pooled_embeddings"]
