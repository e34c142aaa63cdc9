"""Learned projection of the policy's final hidden states for CARFT's CoT embedding.

    e_t = W h_t,    W in R^{d x h}  (d = ContrastiveConfig.projection_dim, paper 64)

Tensor parallelism: megatron applies the final norm to ``[s, b, h]`` and hands it to the
vocab-parallel output layer, which gathers its input when needed. Without sequence
parallelism those hidden states are *replicated* on every TP rank, so a plain replicated
``nn.Linear`` is exact: every TP rank computes identical e_t and identical gradients, and
no TP reduction of W's gradient is needed (like the final norm's weight). With sequence
parallelism the decoder output is ``[s/tp, b, h]``, sharded along the sequence over the TP
group: each rank projects its own tokens, the pooling sums partial results over the TP
group (``seq_group``), and W's gradient on each rank is partial. The head then marks its
parameters ``sequence_parallel = True`` so megatron's ``finalize_model_grads`` sums them
over the TP group, exactly as it does for the norm weights under sequence parallelism.

Differences from the paper code (``modeling_hidden_head_v2.py``): there the 64-d
projection is the first layer of the value head (``V = w^T relu(W h)``) and its output
doubles as e_t, behind dropout; here the projection is its own module (no dropout, no
bias), so the critic and the contrastive embedding can live in different models and be
ablated independently.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ContrastiveHead"]


class ContrastiveHead(nn.Module):
    """``[s, b, h] -> [s, b, d]`` linear projection ``e = W h`` (no bias).

    Args:
        hidden_size: h, the model's hidden size.
        projection_dim: d (paper 64).
        sequence_parallel: the hidden states it sees are sequence-sharded over the TP group
            (megatron ``sequence_parallel``); tags the parameters for the TP gradient sum.
        dtype: parameter dtype (keep float32 for a small head on bf16 models; inputs are cast).
    """

    def __init__(
        self,
        hidden_size: int,
        projection_dim: int = 64,
        *,
        sequence_parallel: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if hidden_size < 1 or projection_dim < 1:
            raise ValueError(f"hidden_size and projection_dim must be >= 1, got {hidden_size}, {projection_dim}")
        self.proj = nn.Linear(hidden_size, projection_dim, bias=False, dtype=dtype)
        # Megatron's default linear init scale keeps e_t of order 1 at the start.
        nn.init.normal_(self.proj.weight, mean=0.0, std=hidden_size**-0.5)
        self.sequence_parallel = sequence_parallel
        for param in self.parameters():
            param.sequence_parallel = sequence_parallel

    def forward(self, hidden: Tensor) -> Tensor:
        """Project final hidden states ``[s, b, h]`` (any leading dims) to ``[s, b, d]``."""
        return self.proj(hidden.to(self.proj.weight.dtype))
