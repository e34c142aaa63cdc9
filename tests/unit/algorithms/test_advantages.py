"""Advantage estimators by name: GAE (hand-computed) and Dr.GRPO's group baseline."""

import pytest
import torch

from carft_nemo.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    AdvantageSettings,
    estimate_advantages,
)

# one row: action column 0 is the prompt's, columns 1..3 the response's
MASK = torch.tensor([[False, True, True, True]])
REWARDS = torch.tensor([[0.0, 0.0, 0.0, 1.0]])  # the score at the last response token
VALUES = torch.tensor([[9.0, 0.5, 0.2, 0.1]])  # 9.0 is off the mask and must not matter


def test_gae_by_hand_gamma_1_lambda_095():
    # delta_3 = 1 - 0.1 = 0.9                       A_3 = 0.9
    # delta_2 = 0.1 - 0.2 = -0.1                    A_2 = -0.1 + 0.95 * 0.9   = 0.755
    # delta_1 = 0.2 - 0.5 = -0.3                    A_1 = -0.3 + 0.95 * 0.755 = 0.41725
    inputs = AdvantageInputs(scores=torch.tensor([1.0]), token_rewards=REWARDS, mask=MASK, values=VALUES)
    out = estimate_advantages("gae", inputs, AdvantageSettings(gamma=1.0, lam=0.95, whiten=False))
    torch.testing.assert_close(out.advantages, torch.tensor([[0.0, 0.41725, 0.755, 0.9]]))
    torch.testing.assert_close(out.returns, torch.tensor([[0.0, 0.91725, 0.955, 1.0]]))


def test_gae_whitening_is_over_the_masked_entries_of_the_whole_rollout():
    mask = torch.tensor([[False, True, True, True], [False, True, False, False]])
    inputs = AdvantageInputs(
        scores=torch.tensor([1.0, 0.0]),
        token_rewards=torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.1, 7.0, 7.0]]),
        mask=mask,
        values=torch.tensor([[0.0, 0.5, 0.2, 0.1], [0.0, 0.3, 5.0, 5.0]]),
    )
    raw = estimate_advantages("gae", inputs, AdvantageSettings(whiten=False)).advantages
    white = estimate_advantages("gae", inputs, AdvantageSettings(whiten=True))
    on = white.advantages[mask]
    assert abs(float(on.mean())) < 1e-6
    assert abs(float(on.std(unbiased=True)) - 1.0) < 1e-4  # ReFT's unbiased variance
    assert torch.all(white.advantages[~mask] == 0)
    # whitening is an affine map of the raw advantages: their order is kept
    assert torch.equal(torch.argsort(raw[mask]), torch.argsort(on))
    # the value targets are not whitened
    torch.testing.assert_close(
        white.returns, estimate_advantages("gae", inputs, AdvantageSettings(whiten=False)).returns
    )


def test_drgrpo_subtracts_the_group_mean_without_std_and_broadcasts():
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True], [False, True, True]])
    inputs = AdvantageInputs(scores=torch.tensor([1.0, 0.0, 0.1, 1.0]), token_rewards=torch.zeros(4, 3), mask=mask)
    out = estimate_advantages("drgrpo", inputs, AdvantageSettings(group_size=2))
    expected_seq = torch.tensor([0.5, -0.5, -0.45, 0.45])
    torch.testing.assert_close(out.advantages, torch.where(mask, expected_seq[:, None].expand(4, 3), 0.0))
    assert out.returns is None


def test_estimators_are_selected_by_name_and_check_their_inputs():
    assert sorted(ADVANTAGE_ESTIMATORS) == ["drgrpo", "gae"]
    inputs = AdvantageInputs(scores=torch.tensor([1.0]), token_rewards=REWARDS, mask=MASK)
    with pytest.raises(KeyError, match="unknown advantage estimator 'ppo'.*drgrpo.*gae"):
        estimate_advantages("ppo", inputs, AdvantageSettings())
    with pytest.raises(ValueError, match="needs values"):
        estimate_advantages("gae", inputs, AdvantageSettings())
    with pytest.raises(ValueError, match="group_size=3 does not divide"):
        estimate_advantages("drgrpo", inputs, AdvantageSettings(group_size=3))
