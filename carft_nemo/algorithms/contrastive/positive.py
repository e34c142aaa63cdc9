"""Positive signal (correct samples): pull the on-policy CoT toward the annotated CoT.

For every sample i whose answer is correct (and whose two CoT masks are non-empty):

    l_i = -min(cos(z_ann_i, z_gen_i), c) / tau + log sum_j exp(cos(z_ann_i, z_gen_j) / tau)

with j over all on-policy embeddings of the global data-parallel batch (non-empty CoT),
the own one included; ``L_pos = mean_i l_i`` over the global batch's correct samples, and
exactly 0 (a constant, no graph) when there are none.

As the authors' my_cl_trainer_v4 runs it (the default): the annotated embedding and the
gathered on-policy embeddings carry no gradient, so the denominator passes none and the only
gradient is the pull ``-(1/tau) d cos(z_ann_i, z_gen_i) / d z_gen_i`` of a correct sample
whose cosine is below the clamp; above it the term is constant.

Differences from the paper code:

* ``gather_with_grad=True`` (ours, off by default) lets gradient through the all-gather: the
  denominators then push every on-policy embedding away from the annotated ones, the
  sample's own among them (above the clamp that is all the term does);
* the mean is over the correct samples of the *global* batch (the paper divides by the
  local count, ``+1e-8``, and lets DDP average), so 2 ranks with half a batch each equal 1
  rank with the whole batch;
* samples with an empty CoT are left out (no anchor, no candidate) instead of pooling the
  uniform softmax the paper's masked_softmax gives.
"""

from __future__ import annotations

import torch
from torch import Tensor

from carft_nemo.algorithms.contrastive.infonce import info_nce_terms, masked_mean_over_group

__all__ = ["positive_loss"]


def positive_loss(
    z_ann: Tensor,
    z_gen: Tensor,
    use: Tensor,
    gen_all: Tensor,
    gen_all_valid: Tensor,
    num_global: int,
    group_size: int,
    tau: float,
    clamp: float | None,
) -> Tensor:
    """This rank's share of ``L_pos`` (see :mod:`.infonce` for the cross-rank convention).

    Args:
        z_ann, z_gen: ``[b, d]`` local annotated / on-policy CoT embeddings.
        use: ``[b]`` bool, correct with both CoTs non-empty.
        gen_all: ``[B, d]`` on-policy embeddings of the global batch (all-gathered),
            ``gen_all_valid [B]`` their non-empty flags.
        num_global: number of ``use`` samples over the global batch (same on all ranks).
    """
    if num_global == 0:
        return torch.zeros((), dtype=z_gen.dtype, device=z_gen.device)
    terms = info_nce_terms(z_ann, z_gen, gen_all, gen_all_valid, tau, clamp)
    return masked_mean_over_group(terms, use, num_global, group_size)
