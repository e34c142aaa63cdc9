"""Per-token log-probabilities and entropy from vocab-parallel logits, without gathering V.

Logits arrive as megatron's ``[b, s, V/tp]`` shard on each tensor-parallel rank. For the
temperature T the sampling distribution is softmax(l / T), so

    log p(y_t) = l_{t,y} / T - logsumexp_v(l_{t,v} / T)

computed by megatron's vocab-parallel cross entropy (which all-reduces max and sum-exp
across the TP group). That function writes into its input, hence the copy.

``vocab_size`` (the tokenizer's size) removes megatron's padded embedding rows from the
softmax, matching the sampling distribution of :mod:`carft_nemo.generation.sampling`; PPO's
ratio between rollout and training log-probs is then exactly 1 before any update, and the
value does not depend on how much padding a TP layout adds.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from carft_nemo.distributed import axes
from carft_nemo.distributed.collectives import all_reduce_max_no_grad, all_reduce_sum_no_grad


def _mask_padded_vocab(scaled: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """Set logits of global ids >= ``vocab_size`` to -inf in this TP rank's shard (in place)."""
    if vocab_size is None:
        return scaled
    shard = scaled.shape[-1]
    rank = axes.rank("tp")
    first_padded = vocab_size - rank * shard  # local index of the first padded column
    if first_padded < shard:
        scaled[..., max(first_padded, 0) :] = float("-inf")
    return scaled


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, vocab_size: int | None = None
) -> torch.Tensor:
    """log p(targets) under softmax(logits / T) over the first ``vocab_size`` ids.

    logits ``[b, s, V/tp]`` (this rank's vocab shard), targets ``[b, s]`` -> ``[b, s]``.
    """
    scaled = logits.float() / temperature if temperature != 1.0 else logits.float().clone()
    scaled = _mask_padded_vocab(scaled, vocab_size)
    # vocab_parallel_cross_entropy wants [s, b, V/tp] and [s, b]
    nll = vocab_parallel_cross_entropy(scaled.transpose(0, 1).contiguous(), targets.t().contiguous())
    return -nll.t()


def token_entropy(logits: torch.Tensor, temperature: float = 1.0, vocab_size: int | None = None) -> torch.Tensor:
    """Entropy H_t = logsumexp(l/T) - sum_v p_v l_v/T of the vocab-parallel distribution, ``[b, s]``."""
    scaled = _mask_padded_vocab(logits.detach().float() / temperature, vocab_size)
    group = axes.group("tp")
    global_max = all_reduce_max_no_grad(scaled.max(dim=-1).values, group)
    shifted = scaled - global_max.unsqueeze(-1)
    exp = shifted.exp()
    sum_exp = all_reduce_sum_no_grad(exp.sum(-1), group)
    # 0 * -inf on padded columns: those terms are 0
    sum_exp_logit = all_reduce_sum_no_grad(torch.where(exp > 0, exp * shifted, torch.zeros_like(exp)).sum(-1), group)
    return sum_exp.log() - sum_exp_logit / sum_exp
