"""Public entry point of the CARFT contrastive signal, called once per PPO micro-batch.

    loss = coef * (w_pos * L_pos + w_neg * L_neg)

``L_pos`` (:mod:`.positive`) over correct samples, ``L_neg`` (:mod:`.negative`) over wrong
samples, each built from value-weighted CoT embeddings (:mod:`.embedding`).

Layout: megatron's ``[s, b, ...]`` from the last pipeline stage. ``s`` may be this rank's
shard of a sequence- or context-parallel group (``seq_group``); ``b`` is this rank's part
of the data-parallel batch (``dp_group``). Process groups are passed in explicitly and only
reach :mod:`carft_nemo.distributed.collectives`.

Cross-rank convention (see :mod:`.infonce`): the returned loss is this rank's share, such
that its mean over data-parallel ranks is the global-batch loss and averaged gradients
are exact. It is identical on every rank of ``seq_group``, and a rank's backward reaches its
own tokens only (through their partial sums of the pooled embedding), so the ranks' gradients
add up to the unsharded one; when losses are summed over that group, count its value once
(:mod:`carft_nemo.workers.actor_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from carft_nemo.algorithms.contrastive.config import ContrastiveConfig
from carft_nemo.algorithms.contrastive.embedding import PooledEmbedding, pool_cot_embedding
from carft_nemo.algorithms.contrastive.negative import negative_loss
from carft_nemo.algorithms.contrastive.positive import positive_loss
from carft_nemo.algorithms.lcs import lcs_masks
from carft_nemo.distributed.collectives import (
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_sum_no_grad,
    group_size,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["CoTBatch", "LcsSpans", "contrastive_loss", "lcs_spans"]


@dataclass(frozen=True)
class CoTBatch:
    """One forward pass's CoT view, megatron layout.

    Attributes:
        embeddings: ``[s, b, d]`` projected token states e_t = W h_t (ContrastiveHead).
        values: ``[s, b]`` value estimates V_t (critic / value head).
        cot_mask: ``[s, b]`` bool, True on CoT tokens (not prompt, not padding).
    """

    embeddings: Tensor
    values: Tensor
    cot_mask: Tensor

    def __post_init__(self) -> None:
        if self.embeddings.dim() != 3:
            raise ValueError(f"embeddings must be [s, b, d], got {tuple(self.embeddings.shape)}")
        s_b = tuple(self.embeddings.shape[:2])
        for name in ("values", "cot_mask"):
            if tuple(getattr(self, name).shape) != s_b:
                raise ValueError(f"{name} must be [s, b] = {s_b}, got {tuple(getattr(self, name).shape)}")

    def detached(self) -> CoTBatch:
        return CoTBatch(self.embeddings.detach(), self.values.detach(), self.cot_mask)


@dataclass(frozen=True)
class LcsSpans:
    """LCS membership of each pair's CoTs, ``[s, b]`` bool in each batch's own layout.

    ``annotated_common`` / ``on_policy_common`` mark the LCS tokens; remainders are
    ``cot_mask & ~common``. ``length [b]`` is the LCS length. Compute them on the full
    sequences (:func:`lcs_spans`, e.g. in the data pipeline) and shard them along ``s``
    with the other ``[s, b]`` tensors under sequence / context parallelism.
    """

    annotated_common: Tensor
    on_policy_common: Tensor
    length: Tensor


def _compact(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``[s, b]`` ids + mask -> ``[b, s]`` masked ids moved to the front, lengths, order."""
    mask_bs = mask.t().bool()
    # Stable sort puts the masked positions first, in their original order.
    order = torch.argsort((~mask_bs).to(torch.int8), dim=1, stable=True)
    return ids.t().gather(1, order), mask_bs.sum(dim=1), order


def lcs_spans(
    annotated_ids: Tensor, annotated_cot_mask: Tensor, on_policy_ids: Tensor, on_policy_cot_mask: Tensor
) -> LcsSpans:
    """Token-level LCS of the annotated and on-policy CoTs of each sample (full sequences).

    Args:
        annotated_ids, annotated_cot_mask: ``[s_a, b]`` token ids and CoT mask.
        on_policy_ids, on_policy_cot_mask: ``[s_g, b]``.
    Only CoT tokens take part (prompt and padding positions are never common).
    """
    a_ids, a_len, a_order = _compact(annotated_ids, annotated_cot_mask)
    g_ids, g_len, g_order = _compact(on_policy_ids, on_policy_cot_mask)
    result = lcs_masks(a_ids, g_ids, a_len, g_len)
    a_common = torch.zeros_like(result.mask_a).scatter_(1, a_order, result.mask_a)
    g_common = torch.zeros_like(result.mask_b).scatter_(1, g_order, result.mask_b)
    return LcsSpans(annotated_common=a_common.t(), on_policy_common=g_common.t(), length=result.length)


def _pool(batch: CoTBatch, mask: Tensor, seq_group: ProcessGroup | None) -> PooledEmbedding:
    return pool_cot_embedding(batch.embeddings, batch.values, mask, seq_group)


def contrastive_loss(
    cfg: ContrastiveConfig,
    on_policy: CoTBatch,
    annotated: CoTBatch,
    correct: Tensor,
    lcs: LcsSpans | None = None,
    dp_group: ProcessGroup | None = None,
    seq_group: ProcessGroup | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CARFT contrastive loss ``coef * (w_pos L_pos + w_neg L_neg)`` for one micro-batch.

    Args:
        cfg: switches and coefficients (variant, tau, clamp, gather_with_grad, ...).
        on_policy: the sampled responses, ``[s_g, b]`` (gradient flows into embeddings and values).
        annotated: the annotated CoTs of the same questions, ``[s_a, b]`` (same ``b`` order).
        correct: ``[b]`` bool, the sampled answer is correct.
        lcs: required when ``cfg.uses_negative``; from :func:`lcs_spans`.
        dp_group: data-parallel group (negatives come from its whole batch); None = local.
        seq_group: group sharding ``s`` (sequence / context parallel); None = unsharded.

    Returns:
        ``(loss, metrics)``: loss is a 0-dim tensor (this rank's share, module docstring;
        a constant 0 without graph when no sample qualifies); metrics are detached 0-dim
        tensors of the global batch: ``contrastive/loss``, ``contrastive/positive_loss``,
        ``contrastive/negative_loss``, ``contrastive/num_positive``, ``contrastive/num_negative``.
    """
    device = on_policy.embeddings.device
    if not cfg.enabled:
        zero = torch.zeros((), device=device)
        return zero, {"contrastive/loss": zero}
    if cfg.uses_negative and lcs is None:
        raise ValueError(f"contrastive variant {cfg.variant} uses the negative signal: pass lcs=lcs_spans(...)")
    batch = on_policy.embeddings.shape[1]
    if annotated.embeddings.shape[1] != batch or correct.shape != (batch,):
        raise ValueError("on_policy, annotated and correct must share the batch dimension b")
    if cfg.detach_annotated:
        annotated = annotated.detached()
    views = _pool_views(cfg, on_policy, annotated, correct.bool(), lcs, seq_group)
    # One gather each for the embeddings (optionally with gradient) and the flags.
    local = torch.cat(views.features, dim=1)
    gathered = all_gather_with_grad(local, dp_group) if cfg.gather_with_grad else all_gather_no_grad(local, dp_group)
    all_flags = all_gather_no_grad(torch.stack(views.flags, dim=1).to(torch.int32), dp_group).bool()
    terms = _signal_terms(cfg, views, gathered, all_flags, group_size(dp_group))
    w_pos, w_neg = cfg.weights
    loss = cfg.coef * (w_pos * terms.positive + w_neg * terms.negative)
    return loss, _metrics(cfg, terms, dp_group, device)


@dataclass
class _Views:
    """Pooled embeddings of one micro-batch's CoT parts, and which samples each signal uses."""

    gen: PooledEmbedding  # the on-policy CoT
    use_pos: Tensor  # [b] correct samples with both CoTs non-empty
    ann: PooledEmbedding | None = None  # the annotated CoT (positive signal)
    common: PooledEmbedding | None = None  # on-policy tokens in the LCS (negative signal)
    rest: PooledEmbedding | None = None  # on-policy tokens outside it
    ann_rest: PooledEmbedding | None = None  # annotated tokens outside it
    use_neg: Tensor | None = None  # [b] wrong samples with both remainders non-empty

    @property
    def features(self) -> list[Tensor]:
        """What is gathered over data parallel: z_gen, then (negative signal) z_common, z_rest."""
        return [self.gen.z] + ([self.common.z, self.rest.z] if self.common is not None else [])

    @property
    def flags(self) -> list[Tensor]:
        """Validity of each feature, then use_pos (and use_neg)."""
        valid = [self.gen.nonempty] + ([self.common.nonempty, self.rest.nonempty] if self.common is not None else [])
        return valid + [self.use_pos] + ([self.use_neg] if self.use_neg is not None else [])


def _pool_views(
    cfg: ContrastiveConfig,
    on_policy: CoTBatch,
    annotated: CoTBatch,
    correct: Tensor,
    lcs: LcsSpans | None,
    seq_group: ProcessGroup | None,
) -> _Views:
    gen = _pool(on_policy, on_policy.cot_mask, seq_group)
    views = _Views(gen=gen, use_pos=correct & gen.nonempty)
    if cfg.uses_positive:
        views.ann = _pool(annotated, annotated.cot_mask, seq_group)
        views.use_pos = views.use_pos & views.ann.nonempty
    if cfg.uses_negative:
        assert lcs is not None
        # the authors pool every LCS token as the common part, the shared prompt's included
        common_mask = on_policy.cot_mask.bool() & lcs.on_policy_common if cfg.lcs_cot_only else lcs.on_policy_common
        views.common = _pool(on_policy, common_mask, seq_group)
        views.rest = _pool(on_policy, on_policy.cot_mask.bool() & ~lcs.on_policy_common, seq_group)
        views.ann_rest = _pool(annotated, annotated.cot_mask.bool() & ~lcs.annotated_common, seq_group)
        views.use_neg = ~correct & views.common.nonempty & views.ann_rest.nonempty
    return views


@dataclass
class _Terms:
    positive: Tensor  # this rank's share of L_pos (0 without the positive signal)
    negative: Tensor  # this rank's share of L_neg
    num_positive: int  # samples over the global batch that the positive term used
    num_negative: int


def _signal_terms(cfg: ContrastiveConfig, views: _Views, gathered: Tensor, all_flags: Tensor, world: int) -> _Terms:
    """L_pos over correct samples against all gathered z_gen; L_neg over wrong ones (module docstring)."""
    zero = torch.zeros((), dtype=views.gen.z.dtype, device=views.gen.z.device)
    terms = _Terms(zero, zero, 0, 0)
    d = views.gen.z.shape[1]
    if cfg.uses_positive:
        terms.num_positive = int(all_flags[:, -2 if cfg.uses_negative else -1].sum())
        terms.positive = positive_loss(
            views.ann.z,
            views.gen.z,
            views.use_pos,
            gathered[:, :d],
            all_flags[:, 0],
            terms.num_positive,
            world,
            cfg.tau,
            cfg.clamp_positive_similarity,
        )
    if cfg.uses_negative:
        terms.num_negative = int(all_flags[:, -1].sum())
        candidates = torch.cat([gathered[:, d : 2 * d], gathered[:, 2 * d : 3 * d]], dim=0)
        candidates_valid = torch.cat([all_flags[:, 1], all_flags[:, 2]], dim=0)
        terms.negative = negative_loss(
            views.ann_rest.z,
            views.common.z,
            views.use_neg,
            candidates,
            candidates_valid,
            terms.num_negative,
            world,
            cfg.tau,
            cfg.clamp_positive_similarity,
        )
    return terms


def _metrics(
    cfg: ContrastiveConfig, terms: _Terms, dp_group: ProcessGroup | None, device: torch.device
) -> dict[str, Tensor]:
    """Global-batch values of the loss and its terms (detached), and how many samples each used."""
    w_pos, w_neg = cfg.weights
    world = group_size(dp_group)
    parts = all_reduce_sum_no_grad(torch.stack([terms.positive.detach(), terms.negative.detach()]), dp_group) / world
    return {
        "contrastive/loss": cfg.coef * (w_pos * parts[0] + w_neg * parts[1]),
        "contrastive/positive_loss": parts[0],
        "contrastive/negative_loss": parts[1],
        "contrastive/num_positive": torch.tensor(float(terms.num_positive), device=device),
        "contrastive/num_negative": torch.tensor(float(terms.num_negative), device=device),
    }
