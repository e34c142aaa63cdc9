"""The batch type every model call takes: named ``[B, ...]`` tensors.

A batch is a mapping from key to a tensor whose first dimension is the ``B`` rows of the
batch (``tokens [B, S]``, ``lengths [B]``, ``ann_embeddings [B, Sa, d]``, ...). Which keys a
call needs, with their shapes, is written where the call is defined: the worker contracts
(:mod:`carft_nemo.workers.contracts`), the experience
(:class:`carft_nemo.rl.experience.Experience`) and the SFT batch (``tokens``, ``labels``,
``loss_mask``, each ``[B, S]``). Rows are split over replicas by
:func:`carft_nemo.distributed.replicas.split_rows` and into micro-batches by
:func:`carft_nemo.training.forward_backward.split_microbatches`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

Batch = Mapping[str, torch.Tensor]


def zero_outside(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """A per-token tensor ``[b, S, ...]`` with zeros where ``keep [b, S]`` (bool) is False."""
    keep = keep.view(*keep.shape, *([1] * (t.dim() - 2)))
    return torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))


__all__ = ["Batch", "zero_outside"]
