"""The sampling distribution (temperature, top-k, top-p) against brute-force definitions."""

from __future__ import annotations

import itertools

import pytest
import torch

from carft_nemo.generation.sampling import choose_tokens, filter_logits, sampling_log_probs


def _brute_kept(logits: list[float], T: float, k: int, p: float) -> set[int]:
    """Kept set by definition: top-k by value, then the smallest most-likely prefix with mass >= p."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    if k:
        order = order[:k]
    z = [torch.tensor(logits[i] / T) for i in order]
    probs = torch.stack(z).softmax(0).tolist()
    kept, mass = [], 0.0
    for i, q in zip(order, probs):
        if mass >= p:
            break
        kept.append(i)
        mass += q
    return set(kept)


@pytest.mark.parametrize("T,k,p", list(itertools.product([0.5, 1.0, 2.0], [0, 1, 3], [1.0, 0.8, 0.3])))
def test_filter_matches_definition(T: float, k: int, p: float) -> None:
    g = torch.Generator().manual_seed(int(T * 10) + k * 100 + int(p * 1000))
    logits = torch.randn(4, 9, generator=g, dtype=torch.float64) * 2
    filtered = filter_logits(logits, T, k, p)
    for row, frow in zip(logits.tolist(), filtered):
        kept = {i for i, v in enumerate(frow.tolist()) if v != float("-inf")}
        assert kept == _brute_kept(row, T, k, p)
        for i in kept:  # kept logits are l / T, unchanged otherwise
            assert frow[i].item() == pytest.approx(row[i] / T, rel=1e-6)


def test_log_probs_renormalise_over_kept_set() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    logp = sampling_log_probs(logits, temperature=1.0, top_k=2)
    expected = torch.tensor([3.0, 2.0]).log_softmax(0)
    assert torch.allclose(logp[0, :2], expected)
    assert torch.isinf(logp[0, 2:]).all()
    assert torch.allclose(logp.exp().sum(-1), torch.ones(1))


def test_padded_vocab_is_never_chosen() -> None:
    logits = torch.zeros(64, 8)
    logits[:, 6:] = 50.0  # padding rows that would dominate
    tok, lp = choose_tokens(logits, greedy=False, vocab_size=6, generator=torch.Generator().manual_seed(0))
    assert int(tok.max()) < 6
    assert torch.allclose(lp, torch.full((64,), -torch.log(torch.tensor(6.0)).item()))
    gtok, _ = choose_tokens(logits, greedy=True, vocab_size=6)
    assert int(gtok.max()) < 6


def test_greedy_is_argmax_with_its_log_prob() -> None:
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(3))
    tok, lp = choose_tokens(logits, greedy=True, temperature=0.7)
    assert torch.equal(tok, logits.argmax(-1))
    assert torch.allclose(lp, (logits / 0.7).log_softmax(-1).gather(1, tok[:, None]).squeeze(1))


def test_sample_frequencies_follow_the_filtered_distribution() -> None:
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -3.0]).repeat(20000, 1)
    tok, lp = choose_tokens(
        logits, greedy=False, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(1)
    )
    probs = sampling_log_probs(logits[:1], 0.8, 0, 0.9).exp()[0]
    freq = torch.bincount(tok, minlength=5).double() / len(tok)
    assert torch.allclose(freq, probs.double(), atol=0.015)
    assert freq[4] == 0  # outside the nucleus
    assert torch.allclose(lp, probs.log()[tok])


def test_same_seed_same_samples() -> None:
    logits = torch.randn(16, 30, generator=torch.Generator().manual_seed(5))
    a, _ = choose_tokens(logits, greedy=False, generator=torch.Generator().manual_seed(9))
    b, _ = choose_tokens(logits, greedy=False, generator=torch.Generator().manual_seed(9))
    c, _ = choose_tokens(logits, greedy=False, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)
