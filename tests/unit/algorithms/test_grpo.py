"""Dr.GRPO: group-mean advantages (no std) and the constant N * T_max loss normaliser."""

from __future__ import annotations

import math

import pytest
import torch

from carft_nemo.algorithms.grpo import drgrpo_normalizer, group_advantages, token_advantages
from carft_nemo.algorithms.ppo import clipped_policy_loss

F64 = torch.float64
T, F = True, False


def test_group_advantages_two_groups_of_three_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 4.0, 0.0], dtype=F64)
    # group means: (1 + 0 + 0.5) / 3 = 0.5 and (2 + 4 + 0) / 3 = 2; no division by the std
    expected = torch.tensor([0.5, -0.5, 0.0, 0.0, 2.0, -2.0], dtype=F64)
    torch.testing.assert_close(group_advantages(rewards, group_size=3), expected)


def test_group_advantages_all_equal_group_is_zero():
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), 2), torch.zeros(4))


@pytest.mark.parametrize("n,g", [(5, 3), (4, 0)])
def test_group_advantages_rejects_bad_sizes(n, g):
    with pytest.raises(ValueError, match=rf"group_size={g}.*N={n}"):
        group_advantages(torch.zeros(n), g)


def test_token_advantages_broadcast_masked():
    mask = torch.tensor([[F, T, T], [F, F, F], [T, T, T]])
    out = token_advantages(torch.tensor([0.5, -1.0, 2.0], dtype=F64), mask)
    expected = torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.0, 0.0], [2.0, 2.0, 2.0]], dtype=F64)
    torch.testing.assert_close(out, expected)


def test_drgrpo_normalizer():
    assert drgrpo_normalizer(2, 4) == 8.0
    with pytest.raises(ValueError):
        drgrpo_normalizer(0, 4)


def _two_samples(log_ratio_b):
    """Group of 2: sample a (reward 1, 1 response token), sample b (reward 0, 3 tokens)."""
    mask = torch.tensor([[T, F, F, F], [T, T, T, F]])
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-2.0, -2.0, -2.0, -2.0]], dtype=F64)
    logp = old.clone()
    logp[1, :3] += torch.tensor(log_ratio_b, dtype=F64)
    adv = token_advantages(group_advantages(torch.tensor([1.0, 0.0], dtype=F64), 2), mask)
    return logp.requires_grad_(True), old, adv, mask


def test_drgrpo_loss_hand_computed():
    # A = (+0.5, -0.5). Sample b has rho = (1, 1.5, 0.5), eps = 0.2:
    #   a, t0: rho 1,   -A rho = -0.5                              -> -0.5
    #   b, t0: rho 1,   -A rho = 0.5                               -> 0.5
    #   b, t1: rho 1.5, max(0.5 * 1.5, 0.5 * 1.2) = max(0.75, 0.6) -> 0.75
    #   b, t2: rho 0.5, max(0.5 * 0.5, 0.5 * 0.8) = max(0.25, 0.4) -> 0.4 (clipped)
    # sum = 1.15; normaliser = 2 samples * 4 max tokens = 8 -> 0.14375
    logp, old, adv, mask = _two_samples([0.0, math.log(1.5), math.log(0.5)])
    total, metrics = clipped_policy_loss(logp, old, adv, mask, clip_ratio=0.2)
    loss = total / drgrpo_normalizer(num_samples=2, max_response_tokens=4)
    assert loss.item() == pytest.approx(0.14375, abs=1e-12)
    assert metrics["policy/clipped_tokens"].item() == 1


def test_drgrpo_long_response_keeps_its_per_token_weight():
    # On-policy (rho = 1): dL/dlogp_t = -A_i / (N * T_max) = -/+0.5 / 8 for every token,
    # whatever the response length.
    logp, old, adv, mask = _two_samples([0.0, 0.0, 0.0])
    total, _ = clipped_policy_loss(logp, old, adv, mask)
    (total / drgrpo_normalizer(2, 4)).backward()
    expected = torch.tensor([[-0.0625, 0.0, 0.0, 0.0], [0.0625, 0.0625, 0.0625, 0.0]], dtype=F64)
    torch.testing.assert_close(logp.grad, expected)
    # GRPO's per-sequence length mean, (1/N) sum_i (1/|o_i|) sum_t (-A_i rho), would give
    # sample a's token 0.5 / (2 * 1) = 0.25 and each of b's tokens only 0.5 / (2 * 3) = 1/12:
    # Dr.GRPO's weights must not depend on |o_i|.
    grpo_weight_a, grpo_weight_b = 0.5 / (2 * 1), 0.5 / (2 * 3)
    assert grpo_weight_b < grpo_weight_a
    assert logp.grad[1, 0].abs().item() == pytest.approx(logp.grad[0, 0].abs().item())
    assert logp.grad[1, 0].abs().item() != pytest.approx(grpo_weight_b)
