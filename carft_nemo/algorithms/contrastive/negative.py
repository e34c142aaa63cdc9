"""Negative signal (wrong samples): split both CoTs by their LCS and contrast the parts.

For a wrong sample i, the token-level LCS of the annotated and the on-policy CoT gives
three pooled embeddings: ``a_i`` (annotated remainder, outside the LCS), ``c_i`` (on-policy
common part) and ``r_i`` (on-policy remainder). With the common part as anchor (as
my_cl_trainer_v9):

    l_i = -min(cos(c_i, a_i), clamp) / tau
          + log( sum_j exp(cos(c_i, c_j) / tau) + sum_j exp(cos(c_i, r_j) / tau) )

j over the global data-parallel batch (parts with a non-empty mask). The anchor is pulled
toward what the annotated CoT does differently and pushed away from what the on-policy
CoTs do differently, i.e. the two remainders are driven apart. ``L_neg`` is the mean over
wrong samples with a non-empty LCS and a non-empty annotated remainder; exactly 0 (no
graph) when there are none.

As the authors' my_cl_trainer_v9 (and v8) by default: the LCS runs over the whole prompt +
CoT sequences, so the shared prompt is in the common part ``c_i`` that is pooled.

Differences from the paper code:

* ``lcs_cot_only=True`` (ours, off by default) takes the LCS of the CoT tokens only, so the
  common part holds CoT tokens alone; the authors' LCS also runs over their batch's left
  padding, ours over the real tokens;
* the common-part candidates are gathered over the data-parallel batch like the
  remainders (the paper uses the local micro-batch only, with gradient), so the loss does
  not depend on how the batch is split over ranks; they carry no gradient unless
  ``gather_with_grad``;
* empty parts are left out of the candidate set instead of entering as zero vectors,
  and anchors need a non-empty annotated remainder (else there is no positive);
* the global mean as in :mod:`.positive`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from carft_nemo.algorithms.contrastive.infonce import info_nce_terms, masked_mean_over_group

__all__ = ["negative_loss"]


def negative_loss(
    z_ann_rest: Tensor,
    z_gen_common: Tensor,
    use: Tensor,
    candidates: Tensor,
    candidates_valid: Tensor,
    num_global: int,
    group_size: int,
    tau: float,
    clamp: float | None,
) -> Tensor:
    """This rank's share of ``L_neg`` (see :mod:`.infonce` for the cross-rank convention).

    Args:
        z_ann_rest: ``[b, d]`` annotated remainders (positives).
        z_gen_common: ``[b, d]`` on-policy common parts (anchors).
        use: ``[b]`` bool, wrong with non-empty LCS and non-empty annotated remainder.
        candidates: ``[K, d]`` global on-policy common parts and remainders (all-gathered),
            ``candidates_valid [K]`` their non-empty flags.
        num_global: number of ``use`` samples over the global batch.
    """
    if num_global == 0:
        return torch.zeros((), dtype=z_gen_common.dtype, device=z_gen_common.device)
    terms = info_nce_terms(z_gen_common, z_ann_rest, candidates, candidates_valid, tau, clamp)
    return masked_mean_over_group(terms, use, num_global, group_size)
