"""Masked cosine InfoNCE shared by the positive and negative signals.

For anchor ``a_i``, positive ``p_i`` and a candidate set ``{c_j : valid_j}`` (the global
data-parallel batch):

    l_i = -min(cos(a_i, p_i), clamp) / tau + log sum_{j valid} exp(cos(a_i, c_j) / tau)

(``clamp`` = ``None`` means no cap). The global loss is the mean over the anchors selected
by ``use_i`` across all data-parallel ranks, ``L = (1/N) sum_{i: use_i} l_i``.

Loss convention across data-parallel ranks: rank ``r`` returns
``L_r = (W / N) sum_{i local, use_i} l_i`` (W = data-parallel size), so the *mean* over
ranks of ``L_r`` is ``L`` and, with gradients averaged across ranks (megatron and torch
DDP default), the averaged gradient is ``dL/dtheta`` exactly -- the same convention as a
per-rank mean PPO loss. Rows are selected with ``torch.where`` (never indexing) so every
rank's loss stays connected to the all-gather, whose backward is a collective.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cosine_matrix", "info_nce_terms", "masked_mean_over_group"]

_EPS = 1e-8


def cosine_matrix(a: Tensor, c: Tensor) -> Tensor:
    """``S[i, j] = cos(a_i, c_j)`` for ``a [n, d]``, ``c [k, d]``; zero vectors give 0."""
    return F.normalize(a, dim=-1, eps=_EPS) @ F.normalize(c, dim=-1, eps=_EPS).t()


def info_nce_terms(
    anchor: Tensor, positive: Tensor, candidates: Tensor, candidate_valid: Tensor, tau: float, clamp: float | None
) -> Tensor:
    """Per-anchor InfoNCE ``l_i`` ``[n]`` (module docstring) with cosine similarity.

    Args:
        anchor, positive: ``[n, d]``; row i of each forms the positive pair.
        candidates: ``[k, d]`` the denominator set; ``candidate_valid [k]`` bool.
    The caller guarantees at least one valid candidate whenever any ``l_i`` is used.
    """
    pos = F.cosine_similarity(anchor, positive, dim=-1, eps=_EPS)
    if clamp is not None:
        pos = pos.clamp(max=clamp)
    logits = (cosine_matrix(anchor, candidates) / tau).masked_fill(~candidate_valid[None, :], float("-inf"))
    return torch.logsumexp(logits, dim=1) - pos / tau


def masked_mean_over_group(terms: Tensor, use: Tensor, global_count: int, group_size: int) -> Tensor:
    """``(W / N) sum_i use_i * l_i``: this rank's share of the global mean (module docstring)."""
    picked = torch.where(use, terms, torch.zeros((), dtype=terms.dtype, device=terms.device))
    return picked.sum() * (group_size / global_count)
