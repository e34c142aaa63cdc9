"""CoT embedding pooling: hand-computed values, safety on empty masks and extreme values, gradcheck."""

from __future__ import annotations

import math

import torch

from carft_nemo.algorithms.contrastive import masked_softmax, pool_cot_embedding


def test_pooling_hand_computed():
    # One sample, 4 tokens: prompt, two CoT tokens with V = 0 and ln 3, padding.
    emb = torch.tensor([[[9.0, 9.0]], [[1.0, 0.0]], [[0.0, 2.0]], [[5.0, 5.0]]], dtype=torch.float64)
    values = torch.tensor([[100.0], [0.0], [math.log(3.0)], [-7.0]], dtype=torch.float64)
    mask = torch.tensor([[False], [True], [True], [False]])
    pooled = pool_cot_embedding(emb, values, mask)
    # weights 1/4 and 3/4: z = 0.25 * (1, 0) + 0.75 * (0, 2)
    torch.testing.assert_close(pooled.z, torch.tensor([[0.25, 1.5]], dtype=torch.float64))
    assert pooled.nonempty.tolist() == [True]


def test_empty_mask_gives_zero_and_no_nan_gradient():
    emb = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    values = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(5, 2, dtype=torch.bool)
    mask[1:3, 1] = True
    pooled = pool_cot_embedding(emb, values, mask)
    assert pooled.nonempty.tolist() == [False, True]
    assert torch.equal(pooled.z[0], torch.zeros(3, dtype=torch.float64))
    pooled.z.sum().backward()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(values.grad).all()
    assert emb.grad[:, 0].abs().sum() == 0 and values.grad[:, 0].abs().sum() == 0


def test_extreme_and_nonfinite_values():
    emb = torch.randn(4, 1, 2, requires_grad=True)
    values = torch.tensor([[float("inf")], [1e30], [-1e30], [float("nan")]], requires_grad=True)
    mask = torch.tensor([[False], [True], [True], [False]])
    pooled = pool_cot_embedding(emb, values, mask)
    torch.testing.assert_close(pooled.z[0], emb[1, 0].detach())  # all weight on the 1e30 token
    pooled.z.sum().backward()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(values.grad).all()


def test_masked_softmax_matches_softmax_on_subset():
    logits = torch.randn(6, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]]).bool()
    weights = masked_softmax(logits, mask, dim=0)
    for col in range(2):
        expected = torch.softmax(logits[mask[:, col], col], dim=0)
        torch.testing.assert_close(weights[mask[:, col], col], expected)
        assert weights[~mask[:, col], col].abs().sum() == 0
    assert weights[:, 2].abs().sum() == 0  # empty column


def test_gradcheck_pooling():
    torch.manual_seed(0)
    emb = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    values = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(6, 3) > 0.4
    mask[0, :] = True
    assert torch.autograd.gradcheck(lambda e, v: pool_cot_embedding(e, v, mask).z, (emb, values))
