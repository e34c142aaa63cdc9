"""Positive / negative InfoNCE against hand-written formulas; gradcheck; switches."""

from __future__ import annotations

import math

import pytest
import torch

from carft_nemo.algorithms.contrastive import (
    ContrastiveConfig,
    CoTBatch,
    LcsSpans,
    contrastive_loss,
    embedding_partial_reward,
    lcs_spans,
)
from carft_nemo.config import ConfigError

F64 = torch.float64


def _one_token_batch(vectors: list[list[float]]) -> CoTBatch:
    """Each sample's CoT is a single token, so its embedding is exactly that token's vector."""
    emb = torch.tensor(vectors, dtype=F64)[None]  # [1, b, d]
    return CoTBatch(
        emb.clone().requires_grad_(True),
        torch.zeros(1, len(vectors), dtype=F64),
        torch.ones(1, len(vectors), dtype=torch.bool),
    )


def _cos(u, v) -> float:
    dot = sum(x * y for x, y in zip(u, v))
    return dot / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))


def test_positive_loss_hand_computed():
    gen = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    ann = [[1.0, 0.2], [1.0, 0.0], [0.0, 3.0]]
    correct = torch.tensor([True, False, True])
    tau = 0.5
    cfg = ContrastiveConfig(variant="v4", coef=1.0, tau=tau, clamp_positive_similarity=None)
    loss, metrics = contrastive_loss(cfg, _one_token_batch(gen), _one_token_batch(ann), correct)
    expected = 0.0
    for i in (0, 2):
        denom = sum(math.exp(_cos(ann[i], g) / tau) for g in gen)
        expected += -math.log(math.exp(_cos(ann[i], gen[i]) / tau) / denom)
    expected /= 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["contrastive/positive_loss"].item() == pytest.approx(expected, rel=1e-12)
    assert metrics["contrastive/num_positive"].item() == 2


def test_positive_clamp_caps_numerator_only():
    gen = [[1.0, 0.0], [0.0, 1.0]]
    cfg = ContrastiveConfig(variant="v4", coef=1.0, tau=0.2, clamp_positive_similarity=0.9)
    loss, _ = contrastive_loss(cfg, _one_token_batch(gen), _one_token_batch(gen), torch.tensor([True, False]))
    denom = math.exp(1.0 / 0.2) + math.exp(0.0)  # the denominator keeps the unclamped cos = 1
    assert loss.item() == pytest.approx(-(0.9 / 0.2) + math.log(denom), rel=1e-12)


def test_no_correct_samples_gives_constant_zero():
    cfg = ContrastiveConfig(variant="v4")
    gen = _one_token_batch([[1.0, 0.0], [0.0, 1.0]])
    loss, _ = contrastive_loss(cfg, gen, _one_token_batch([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([False, False]))
    assert loss.item() == 0.0 and not loss.requires_grad


def test_v4_gradient_by_hand():
    """v4's only gradient: -(1/tau) d cos(a, g) / d g for correct samples below the clamp, over their count."""
    # sample 0: a = (1, 0), g = (1, 1), cos = 0.7071 < 0.9 -> pulled;  sample 1: cos = 0.995 > 0.9 -> nothing;
    # sample 2 is wrong -> nothing.  d cos / d g = a / (|a||g|) - cos * g / |g|^2 = (0.35355, -0.35355)
    gen = _one_token_batch([[1.0, 1.0], [1.0, 0.1], [0.0, 1.0]])
    ann = _one_token_batch([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    cfg = ContrastiveConfig(variant="v4", coef=1.0, tau=0.2)
    assert not cfg.gather_with_grad and cfg.clamp_positive_similarity == 0.9  # the authors' defaults
    loss, metrics = contrastive_loss(cfg, gen, ann, torch.tensor([True, True, False]))
    loss.backward()
    per_sample = -(1 / 0.2) * torch.tensor([0.5**0.5 - 0.5**0.5 / 2, -(0.5**0.5) / 2], dtype=F64)
    expected = torch.zeros(3, 2, dtype=F64)
    expected[0] = per_sample / 2  # the mean over the 2 correct samples
    torch.testing.assert_close(gen.embeddings.grad[0], expected)
    assert torch.allclose(expected[0], torch.tensor([-0.8839, 0.8839], dtype=F64), atol=1e-4)
    assert ann.embeddings.grad is None
    assert metrics["contrastive/num_positive"].item() == 2


def test_v4_sends_no_gradient_when_every_correct_pair_is_above_the_clamp():
    gen = _one_token_batch([[1.0, 0.1], [0.2, 1.0], [0.0, 1.0]])
    ann = _one_token_batch([[1.0, 0.0], [0.1, 1.0], [1.0, 0.0]])  # cos 0.995 and 0.996; sample 2 is wrong
    loss, _ = contrastive_loss(ContrastiveConfig(variant="v4", coef=1.0), gen, ann, torch.tensor([True, True, False]))
    assert loss.item() > 0  # the term has a value: the denominators
    loss.backward()
    assert torch.count_nonzero(gen.embeddings.grad) == 0
    # with the gradient through the gather (ours), the same pairs are pushed apart
    gen2 = _one_token_batch([[1.0, 0.1], [0.2, 1.0], [0.0, 1.0]])
    cfg = ContrastiveConfig(variant="v4", coef=1.0, gather_with_grad=True)
    contrastive_loss(cfg, gen2, ann, torch.tensor([True, True, False]))[0].backward()
    assert torch.count_nonzero(gen2.embeddings.grad) > 0


def test_paper_gather_passes_no_denominator_gradient():
    """gather_with_grad=False: only the positive numerator -cos(z_ann, z_gen)/tau sends gradient."""
    gen = _one_token_batch([[1.0, 0.5], [0.3, 1.0], [-1.0, 0.2]])
    ann = [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    cfg = ContrastiveConfig(variant="v4", coef=1.0, tau=0.2, clamp_positive_similarity=None, gather_with_grad=False)
    correct = torch.tensor([True, True, False])
    loss, _ = contrastive_loss(cfg, gen, _one_token_batch(ann), correct)
    loss.backward()
    z = gen.embeddings.detach()[0].clone().requires_grad_(True)
    numer = -(torch.nn.functional.cosine_similarity(torch.tensor(ann, dtype=F64), z, dim=-1) / 0.2)
    (numer[:2].sum() / 2).backward()
    torch.testing.assert_close(gen.embeddings.grad[0], z.grad)


def test_negative_loss_hand_computed():
    # Sample 0 (wrong): CoT tokens annotated [5, 6, 7], on-policy [5, 8, 7] -> LCS {5, 7}.
    # Sample 1 (correct): annotated [1, 2], on-policy [1, 3]: its common part / remainder are candidates.
    ann_ids = torch.tensor([[5, 1], [6, 2], [7, 0]])
    gen_ids = torch.tensor([[5, 1], [8, 3], [7, 0]])
    ann_mask = torch.tensor([[True, True], [True, True], [True, False]])
    gen_mask = ann_mask.clone()
    spans = lcs_spans(ann_ids, ann_mask, gen_ids, gen_mask)
    assert spans.length.tolist() == [2, 1]
    assert spans.on_policy_common[:, 0].tolist() == [True, False, True]

    torch.manual_seed(0)
    gen_emb = torch.randn(3, 2, 2, dtype=F64)
    ann_emb = torch.randn(3, 2, 2, dtype=F64)
    gen_val = torch.tensor([[0.0, 0.0], [0.0, 0.0], [math.log(2.0), 0.0]], dtype=F64)
    zeros = torch.zeros(3, 2, dtype=F64)
    tau = 0.3
    cfg = ContrastiveConfig(variant="v8", coef=1.0, tau=tau, clamp_positive_similarity=None)
    loss, metrics = contrastive_loss(
        cfg,
        CoTBatch(gen_emb, gen_val, gen_mask),
        CoTBatch(ann_emb, zeros, ann_mask),
        torch.tensor([False, True]),
        spans,
    )
    # Hand pooling: common of sample 0 = (1/3) e_0 + (2/3) e_2; its annotated remainder = token 1.
    common0 = (gen_emb[0, 0] + 2 * gen_emb[2, 0]) / 3
    ann_rest0 = ann_emb[1, 0]
    candidates = [common0, gen_emb[1, 0], gen_emb[0, 1], gen_emb[1, 1]]  # commons and remainders
    denom = sum(math.exp(_cos(common0.tolist(), c.tolist()) / tau) for c in candidates)
    expected = -_cos(common0.tolist(), ann_rest0.tolist()) / tau + math.log(denom)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert metrics["contrastive/num_negative"].item() == 1


def _random_case(b: int = 4, s: int = 6, d: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gen = CoTBatch(
        torch.randn(s, b, d, dtype=F64, generator=g).requires_grad_(True),
        torch.randn(s, b, dtype=F64, generator=g).requires_grad_(True),
        torch.rand(s, b, generator=g) > 0.2,
    )
    ann = CoTBatch(
        torch.randn(s, b, d, dtype=F64, generator=g).requires_grad_(True),
        torch.randn(s, b, dtype=F64, generator=g).requires_grad_(True),
        torch.rand(s, b, generator=g) > 0.2,
    )
    spans = lcs_spans(
        torch.randint(0, 3, (s, b), generator=g), ann.cot_mask, torch.randint(0, 3, (s, b), generator=g), gen.cot_mask
    )
    correct = torch.tensor([True, False, True, False][:b])
    return gen, ann, spans, correct


@pytest.mark.parametrize("variant", ["v4", "v8", "v9"])
def test_gradcheck_losses(variant: str):
    gen, ann, spans, correct = _random_case()
    # every path differentiable (the gather with gradient, the annotated side live): the math is checked
    cfg = ContrastiveConfig(
        variant=variant, coef=1.0, detach_annotated=False, clamp_positive_similarity=None, gather_with_grad=True
    )

    def fn(ge, gv, ae, av):
        return contrastive_loss(cfg, CoTBatch(ge, gv, gen.cot_mask), CoTBatch(ae, av, ann.cot_mask), correct, spans)[0]

    loss = fn(gen.embeddings, gen.values, ann.embeddings, ann.values)
    assert loss.requires_grad and loss.item() > 0
    assert torch.autograd.gradcheck(fn, (gen.embeddings, gen.values, ann.embeddings, ann.values))


def test_variants_combine_with_weights():
    gen, ann, spans, correct = _random_case(seed=3)
    vals = {
        v: contrastive_loss(ContrastiveConfig(variant=v, coef=1.0), gen, ann, correct, spans)[0].item()
        for v in ("v4", "v8", "v9", "v11")
    }
    assert vals["v9"] == pytest.approx(0.5 * vals["v4"] + 0.5 * vals["v8"], rel=1e-12)  # 0.5 * (pos + neg)
    assert vals["v11"] == vals["v4"]  # v11 changes the reward, not the loss
    scaled = contrastive_loss(
        ContrastiveConfig(variant="v9", coef=0.3, positive_weight=1.0, negative_weight=0.0), gen, ann, correct, spans
    )[0].item()
    assert scaled == pytest.approx(0.3 * vals["v4"], rel=1e-12)
    off = contrastive_loss(ContrastiveConfig(enabled=False), gen, ann, correct, spans)[0]
    assert off.item() == 0 and not off.requires_grad


def test_detach_annotated_blocks_annotated_gradient():
    gen, ann, spans, correct = _random_case(seed=5)
    loss, _ = contrastive_loss(ContrastiveConfig(variant="v9"), gen, ann, correct, spans)
    loss.backward()
    assert ann.embeddings.grad is None and gen.embeddings.grad.abs().sum() > 0


def test_negative_signal_requires_lcs():
    gen, ann, _, correct = _random_case()
    with pytest.raises(ValueError, match="lcs"):
        contrastive_loss(ContrastiveConfig(variant="v8"), gen, ann, correct, None)


@pytest.mark.parametrize(
    "field,value",
    [("variant", "v5"), ("tau", 0.0), ("projection_dim", 0), ("clamp_positive_similarity", 1.5), ("coef", -1.0)],
)
def test_config_validation_names_field(field: str, value):
    # keys are relative to the component; the loader prefixes its place (tests/unit/config/test_full_keys.py)
    with pytest.raises(ConfigError, match=f"^{field}: "):
        ContrastiveConfig(**{field: value})


def test_partial_reward_hand_computed():
    z_ann = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    z_gen = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0])
    partial = torch.tensor([True, True, True, False])
    out = embedding_partial_reward(ContrastiveConfig(variant="v11"), z_ann, z_gen, rewards, partial)
    torch.testing.assert_close(out, torch.tensor([0.3, 0.1, 0.2, 1.0]))
    assert not out.requires_grad
    custom = ContrastiveConfig(variant="v11", partial_reward_scale=0.5, partial_reward_offset=0.0)
    torch.testing.assert_close(
        embedding_partial_reward(custom, z_ann, z_gen, rewards, partial)[:2], torch.tensor([0.5, -0.5])
    )
    off = embedding_partial_reward(ContrastiveConfig(variant="v4"), z_ann, z_gen, rewards, partial)
    torch.testing.assert_close(off, rewards)


def test_lcs_spans_ignore_prompt_and_padding():
    # [s, b] layout, one sample: prompt tokens equal in both, CoT differs, then padding.
    ann_ids = torch.tensor([[4], [4], [1], [2], [3], [0]])
    gen_ids = torch.tensor([[4], [4], [2], [9], [3], [0]])
    ann_mask = torch.tensor([[0], [0], [1], [1], [1], [0]]).bool()
    gen_mask = ann_mask.clone()
    spans = lcs_spans(ann_ids, ann_mask, gen_ids, gen_mask)
    assert isinstance(spans, LcsSpans)
    assert spans.length.tolist() == [2]
    assert spans.annotated_common[:, 0].tolist() == [False, False, False, True, True, False]
    assert spans.on_policy_common[:, 0].tolist() == [False, False, True, False, True, False]


def test_variants_select_the_authors_trainers():
    assert (ContrastiveConfig().variant, ContrastiveConfig().uses_negative) == ("v4", False)
    signals = {
        v: (c.uses_positive, c.uses_negative, c.partial_reward, c.weights)
        for v in ("v4", "v8", "v9", "v11")
        for c in [ContrastiveConfig(variant=v)]
    }
    assert signals == {
        "v4": (True, False, False, (1.0, 0.0)),
        "v8": (False, True, False, (0.0, 1.0)),
        "v9": (True, True, False, (0.5, 0.5)),
        "v11": (True, False, True, (1.0, 0.0)),
    }
