"""From the pool's rewards to RL's scores: CARFT's partial reward, then the unfinished score."""

import torch

from carft_nemo.algorithms.contrastive import ContrastiveConfig
from carft_nemo.algorithms.reward_shaping import PartialRewardTerm, shape_rewards, unfinished_scores


def test_unfinished_score_replaces_only_unfinished_samples():
    scores = torch.tensor([1.0, 0.25, 0.0])
    finished = torch.tensor([True, False, False])
    assert unfinished_scores(scores, finished, -0.5).tolist() == [1.0, -0.5, -0.5]
    same = unfinished_scores(scores, finished, None)
    assert same.tolist() == [1.0, 0.25, 0.0] and same.data_ptr() != scores.data_ptr()  # a copy


def _partial(partial_reward: bool) -> PartialRewardTerm:
    # cos(z_ann, z_gen) per sample: 1, 0, 1
    return PartialRewardTerm(
        config=ContrastiveConfig(
            variant="v11" if partial_reward else "v4", partial_reward_scale=0.1, partial_reward_offset=0.2
        ),
        z_annotated=torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]]),
        z_on_policy=torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 1.0]]),
        wrong_extractable=torch.tensor([False, True, True]),
    )


def test_partial_reward_applies_to_wrong_extractable_samples_then_the_unfinished_score():
    rewards = torch.tensor([1.0, 0.1, 0.1])
    finished = torch.tensor([True, True, False])
    shaped = shape_rewards(rewards, finished, unfinished_score=-1.0, partial=_partial(True))
    torch.testing.assert_close(shaped.rewards, torch.tensor([1.0, 0.2, 0.3]))  # 0.1 * cos + 0.2
    torch.testing.assert_close(shaped.scores, torch.tensor([1.0, 0.2, -1.0]))
    assert abs(shaped.partial_reward_mean - 0.25) < 1e-6


def test_partial_reward_off_keeps_the_pool_rewards():
    rewards = torch.tensor([1.0, 0.1, 0.1])
    shaped = shape_rewards(rewards, torch.ones(3, dtype=torch.bool), partial=_partial(False))
    assert torch.equal(shaped.rewards, rewards) and torch.equal(shaped.scores, rewards)
    assert shaped.partial_reward_mean is None
    plain = shape_rewards(rewards, torch.ones(3, dtype=torch.bool))
    assert torch.equal(plain.scores, rewards) and plain.partial_reward_mean is None
