"""The per-step sampling distribution: temperature, top-k, top-p; pure tensor code.

For logits l over the vocabulary, temperature T, the kept set K (top-k, then nucleus):

    p(y) = exp(l_y / T) / sum_{v in K} exp(l_v / T)   for y in K, else 0          (1)

which is what HF ``generate`` samples from (its warpers run in the same order:
temperature, top-k, top-p). ``log p`` of the chosen token is what PPO's ratio needs when
rollouts were drawn from (1).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, vocab_size: int | None = None
) -> torch.Tensor:
    """Scaled logits l/T with tokens outside K set to -inf; ``[..., V]`` -> ``[..., V]`` (fp32).

    ``vocab_size`` drops megatron's padded embedding rows (ids >= the tokenizer's size),
    which no tokenizer can decode. Top-p keeps a token while the mass of the strictly more
    likely tokens is below ``top_p``, so the most likely token always stays.
    """
    scaled = logits.float() / temperature
    if vocab_size is not None and vocab_size < scaled.shape[-1]:
        scaled = scaled.clone()
        scaled[..., vocab_size:] = NEG_INF
    if 0 < top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, NEG_INF)
    if top_p < 1.0:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, NEG_INF)
    return scaled


def sampling_log_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, vocab_size: int | None = None
) -> torch.Tensor:
    """log p of equation (1) for every token, ``[..., V]`` (-inf outside the kept set)."""
    return filter_logits(logits, temperature, top_k, top_p, vocab_size).log_softmax(dim=-1)


def choose_tokens(
    logits: torch.Tensor,
    *,
    greedy: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    vocab_size: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens ``[b]`` and their log-probs ``[b]`` under (1) from last-position logits ``[b, V]``."""
    logp = sampling_log_probs(logits, temperature, top_k, top_p, vocab_size)
    if greedy:
        tokens = logp.argmax(dim=-1)
    else:
        tokens = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
