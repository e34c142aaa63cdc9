"""Supervised fine-tuning loss on annotated CoT: token-mean NLL over response tokens.

    L_SFT = - (1 / N) * sum_{i, t} m_{i,t} * log p_theta(y_{i,t} | y_{i,<t}, x_i),

where m masks the response (CoT + answer + EOS) tokens and N = sum m over the *global*
batch, so the loss (and its gradient) is the same whatever the data/pipeline layout.
"""

from __future__ import annotations

import torch


def masked_token_nll_sum(logprobs: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """sum_{i,t} -m_{i,t} log p_{i,t}; ``logprobs`` and ``loss_mask`` are ``[b, s]``."""
    return -(logprobs * loss_mask.to(logprobs.dtype)).sum()


def shift_for_next_token(
    tokens: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, target mask): position t predicts token t+1. Shapes ``[b, s-1]``."""
    return tokens[:, :-1], tokens[:, 1:], loss_mask[:, 1:]
