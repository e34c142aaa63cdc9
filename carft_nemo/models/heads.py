"""Heads that sit on the final (normed) hidden states of the last pipeline stage."""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class ValueHead(torch.nn.Module):
    """Scalar value V_t = w^T h_t + b, in place of the LM output layer (critic).

    Hidden states after the final norm are replicated across tensor-parallel ranks, so the
    head is a plain replicated linear layer. It keeps the ``output_layer`` call convention
    of megatron's GPTModel (``(hidden, weight=None, ...) -> (out, bias)``) so pipeline
    schedules and GPTModel.forward run unchanged; GPTModel then returns ``[b, s, 1]``.
    Initialised to zero so a fresh critic starts from V = 0 (the score's scale is unknown).
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(config.hidden_size, 1, bias=True, dtype=config.params_dtype)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)
        self.sequence_parallel = False

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor | None = None, **_: object):
        return self.linear(hidden.to(self.linear.weight.dtype)), None
