"""Vocab-parallel log-probs and entropy exclude megatron's padded vocabulary rows (TP=1, TP=2)."""

from __future__ import annotations

import torch

from tests.multiprocess import run_ranks

VOCAB, PADDED, T = 37, 48, 0.7  # 48 = padded to a multiple of 8 * TP(2) * 3


def _check(rank: int, world: int) -> dict[str, float]:
    from megatron.core import parallel_state as ps

    from carft_nemo.distributed.layout import ParallelConfig, initialize
    from carft_nemo.models.logprobs import token_entropy, token_logprobs

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, PADDED, generator=gen, dtype=torch.float64).float() * 3
    targets = torch.randint(0, VOCAB, (2, 5), generator=gen)
    ref_logp = torch.log_softmax(logits[..., :VOCAB] / T, -1)
    ref = ref_logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ref_entropy = -(ref_logp.exp() * ref_logp).sum(-1)
    unmasked = torch.log_softmax(logits / T, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    out = {}
    for tp in (1, 2):
        initialize(ParallelConfig(tensor_parallel=tp))
        shard = PADDED // tp
        local = logits[..., ps.get_tensor_model_parallel_rank() * shard :][..., :shard].clone()
        out[f"tp{tp}_logp"] = (token_logprobs(local, targets, T, vocab_size=VOCAB) - ref).abs().max().item()
        out[f"tp{tp}_entropy"] = (token_entropy(local, T, vocab_size=VOCAB) - ref_entropy).abs().max().item()
        out[f"tp{tp}_unmasked_gap"] = (token_logprobs(local, targets, T) - ref).abs().max().item()
    out["padding_matters"] = (unmasked - ref).abs().max().item()
    return out


def test_padded_vocab_is_excluded_at_tp1_and_tp2() -> None:
    for result in run_ranks(_check, 2):
        for tp in (1, 2):
            assert result[f"tp{tp}_logp"] < 1e-5, result
            assert result[f"tp{tp}_entropy"] < 1e-5, result
            assert result[f"tp{tp}_unmasked_gap"] > 1e-3, result  # without vocab_size the padding counts
