"""The experience of one rollout: rollout joins, the LCS split, annotated rows, values, KL, the assembly."""

import pytest
import torch

from carft_nemo.algorithms.advantages import AdvantageSettings
from carft_nemo.algorithms.contrastive import ContrastiveConfig
from carft_nemo.data.tokenization import EncodedExample
from carft_nemo.generation.rollout import Rollout
from carft_nemo.rl.experience import (
    AnnotatedBatch,
    ExperienceSettings,
    InferenceResults,
    action_mask,
    build_experience,
    forward_rows,
    join_rollouts,
    lcs_split,
    penalized_token_rewards,
    select_values,
    split_annotated_outputs,
    with_annotated_rows,
)
from carft_nemo.workers.reward import ScoredSample


def test_join_rollouts_keeps_replica_order_and_action_mask_alignment():
    a = Rollout(prompts=[[1, 2]], responses=[[5, 6, 7]], logprobs=[[-1.0, -2.0, -3.0]], finished=[True])
    b = Rollout(prompts=[[3]], responses=[[8]], logprobs=[[-0.5]], finished=[False])
    joined = join_rollouts([a, b])
    batch = joined.to_batch(pad_token_id=0)
    assert batch.tokens.tolist() == [[1, 2, 5, 6, 7], [3, 8, 0, 0, 0]]
    # action column j is token j+1: row 0 responds at tokens 2..4 -> columns 1..3
    assert action_mask(batch).tolist() == [[False, True, True, True], [True, False, False, False]]
    assert joined.finished == [True, False]


def test_lcs_split_marks_common_cot_tokens_only():
    # annotated: prompt [1, 2], CoT [7, 8, 9]; on-policy: prompt [1, 2], response [7, 4, 9]
    annotated = AnnotatedBatch.build([EncodedExample("q", [1, 2, 7, 8, 9], [0, 0, 1, 1, 1], 2)], pad_id=0)
    rollout = Rollout(prompts=[[1, 2]], responses=[[7, 4, 9]], logprobs=[[0.0] * 3], finished=[True]).to_batch(0)
    split = lcs_split(annotated, rollout, cot_only=True)
    assert split["lcs_length"].tolist() == [2]
    assert split["ann_common"].tolist() == [[False, False, True, False, True]]
    assert split["gen_common"].tolist() == [[False, False, True, False, True]]
    # the authors' LCS runs over the whole sequences: the shared prompt is common too
    whole = lcs_split(annotated, rollout)
    assert whole["lcs_length"].tolist() == [4]
    assert whole["gen_common"].tolist() == [[True, True, True, False, True]]


# ---------------------------------------------------------------------------- annotated rows


def test_annotated_rows_ride_in_the_same_call_and_come_back_cut_to_their_widths():
    rollout = Rollout(prompts=[[1, 2], [3]], responses=[[5, 6], [7]], logprobs=[[0.0] * 2, [0.0]], finished=[True] * 2)
    batch = rollout.to_batch(pad_token_id=0)  # S = 4
    annotated = AnnotatedBatch.build(
        [EncodedExample("a", [1, 2, 8, 8, 8, 9], [0, 0, 1, 1, 1, 1], 2), EncodedExample("b", [3, 8, 9], [0, 1, 1], 1)],
        pad_id=0,
    )  # Sa = 6
    rows = with_annotated_rows(forward_rows(batch), annotated, pad_id=0)
    assert rows["tokens"].tolist() == [
        [1, 2, 5, 6, 0, 0],
        [3, 7, 0, 0, 0, 0],
        [1, 2, 8, 8, 8, 9],
        [3, 8, 9, 0, 0, 0],
    ]
    assert rows["lengths"].tolist() == [4, 2, 6, 3]
    # a per-token output of the stacked call: position p of row r holds 10 r + p
    values = torch.arange(4)[:, None] * 10.0 + torch.arange(6)[None, :]
    logprobs = values[:, :5]
    on_policy, ann = split_annotated_outputs(
        {"values": values, "logprobs": logprobs}, rows=2, width=4, annotated_width=6
    )
    assert on_policy["values"].tolist() == [[0, 1, 2, 3], [10, 11, 12, 13]]
    assert on_policy["logprobs"].shape == (2, 3) and ann["logprobs"].shape == (2, 5)
    assert ann["values"][:, 0].tolist() == [20, 30]


# ---------------------------------------------------------------------------- values and the KL penalty


def _scored(*rows: tuple[float, bool, bool]) -> list[ScoredSample]:
    return [ScoredSample(reward, correct, extracted, None) for reward, correct, extracted in rows]


def test_value_selection_reads_the_shared_head_or_the_critic():
    policy_values, critic_values = torch.ones(1, 3), torch.full((1, 3), 2.0)
    results = InferenceResults(
        policy={"logprobs": torch.zeros(1, 2), "values": policy_values},
        scored=_scored((1.0, True, True)),
        critic={"values": critic_values},
        policy_annotated={"values": torch.full((1, 4), 3.0)},
        critic_annotated={"values": torch.full((1, 4), 4.0)},
    )
    values, annotated = select_values(results, shared_value_head=True)
    assert values is policy_values and float(annotated[0, 0]) == 3.0
    values, annotated = select_values(results, shared_value_head=False)
    assert values is critic_values and float(annotated[0, 0]) == 4.0
    results.critic = None
    with pytest.raises(ValueError, match="no values from the critic"):
        select_values(results, shared_value_head=False)


def test_kl_penalty_per_token_and_zero_without_a_reference():
    mask = torch.tensor([[False, True, True]])
    logprobs = torch.tensor([[0.0, -1.0, -2.0]])
    rewards, kl = penalized_token_rewards(torch.tensor([1.0]), logprobs, torch.tensor([[5.0, -1.5, -1.0]]), mask, 0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.0, 0.5, -1.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[0.0, -0.05, 1.1]]))  # -0.1 * kl, + the score at the end
    rewards, kl = penalized_token_rewards(torch.tensor([1.0]), logprobs, None, mask, 0.1)
    assert torch.all(kl == 0) and rewards.tolist() == [[0.0, 0.0, 1.0]]


# ---------------------------------------------------------------------------- the whole assembly


def _ppo_settings(**kw) -> ExperienceSettings:
    base = dict(estimator="gae", advantage=AdvantageSettings(gamma=1.0, lam=0.95, whiten=False), kl_coef=0.1)
    return ExperienceSettings(**{**base, **kw})


def test_ppo_experience_by_hand():
    # prompt [1, 2], response [5, 6] (S = 4, T = 3, action columns 1 and 2), answer correct
    batch = Rollout(prompts=[[1, 2]], responses=[[5, 6]], logprobs=[[0.0, 0.0]], finished=[True]).to_batch(0)
    results = InferenceResults(
        policy={"logprobs": torch.tensor([[-9.0, -1.0, -2.0]])},  # column 0 is the prompt's: masked out
        scored=_scored((1.0, True, True)),
        critic={"values": torch.tensor([[0.3, 0.4, 0.6, 9.9]])},
        reference_logprobs=torch.tensor([[0.0, -1.5, -1.0]]),
    )
    exp, metrics = build_experience(batch, None, results, _ppo_settings())
    # token rewards [0, -0.05, 1.1]; V of the action states [0, 0.4, 0.6]
    # A_2 = 1.1 - 0.6 = 0.5;  A_1 = (-0.05 + 0.6 - 0.4) + 0.95 * 0.5 = 0.625
    torch.testing.assert_close(exp.advantages, torch.tensor([[0.0, 0.625, 0.5]]))
    torch.testing.assert_close(exp.returns, torch.tensor([[0.0, 1.025, 1.1]]))
    torch.testing.assert_close(exp.old_values, torch.tensor([[0.0, 0.4, 0.6]]))
    torch.testing.assert_close(exp.old_logprobs, torch.tensor([[0.0, -1.0, -2.0]]))
    assert exp.carft is None
    expected = {
        "reward": 1.0,
        "score": 1.0,
        "accuracy": 1.0,
        "extracted": 1.0,
        "kl": -0.5,
        "value_mean": 0.5,
        "return_mean": 1.0625,
        "response_length": 2.0,
        "finished": 1.0,
        "advantage_abs_mean": 0.5625,
    }
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert abs(metrics[key] - value) < 1e-6, key
    assert set(exp.actor_batch(with_value_targets=False)) == {"tokens", "action_mask", "old_logprobs", "advantages"}
    assert set(exp.actor_batch(with_value_targets=True)) >= {"old_values", "returns"}
    assert set(exp.critic_batch()) == {"tokens", "action_mask", "old_values", "returns"}


def test_drgrpo_experience_uses_group_baselines_and_the_unfinished_score():
    rollout = Rollout(
        prompts=[[1]] * 4,
        responses=[[5], [5, 6], [7], [7, 8]],
        logprobs=[[0.0], [0.0] * 2, [0.0], [0.0] * 2],
        finished=[True, True, True, False],
    )
    results = InferenceResults(
        policy={"logprobs": torch.zeros(4, 2)},
        scored=_scored((1.0, True, True), (0.1, False, True), (0.0, False, False), (1.0, True, True)),
    )
    settings = ExperienceSettings(
        estimator="drgrpo", advantage=AdvantageSettings(group_size=2), kl_coef=0.0, unfinished_score=-1.0
    )
    exp, metrics = build_experience(rollout.to_batch(0), None, results, settings)
    # scores [1, 0.1, 0, -1] (the last one hit the length limit); group means 0.55 and -0.5
    assert exp.advantages[:, 0].tolist() == pytest.approx([0.45, -0.45, 0.5, -0.5])
    assert exp.advantages[2, 1] == 0  # off the mask
    assert exp.old_values is None and exp.returns is None
    assert metrics["score"] == pytest.approx(0.025) and metrics["reward"] == pytest.approx(0.525)
    with pytest.raises(ValueError, match="no value targets"):
        exp.critic_batch()


def _carft_case():
    rollout = Rollout(
        prompts=[[1, 2]] * 2, responses=[[7, 4, 9], [7, 8]], logprobs=[[0.0] * 3, [0.0] * 2], finished=[True, True]
    ).to_batch(0)
    annotated = AnnotatedBatch.build([EncodedExample("q", [1, 2, 7, 8, 9], [0, 0, 1, 1, 1], 2)] * 2, pad_id=0)
    d = 2
    on_policy_emb = torch.zeros(2, 5, d)
    on_policy_emb[0, :, 0] = 1.0  # sample 0's CoT points along x, sample 1's along y
    on_policy_emb[1, :, 1] = 1.0
    results = InferenceResults(
        policy={"logprobs": torch.zeros(2, 4), "embeddings": on_policy_emb},
        scored=_scored((1.0, True, True), (0.1, False, True)),
        critic={"values": torch.zeros(2, 5)},
        policy_annotated={"embeddings": torch.tensor([[1.0, 0.0]]).expand(2, 5, d).clone()},
        critic_annotated={"values": torch.zeros(2, 5)},
    )
    return rollout, annotated, results


def test_carft_v9_experience_carries_the_lcs_split():
    rollout, annotated, results = _carft_case()
    exp, metrics = build_experience(
        rollout, annotated, results, _ppo_settings(contrastive=ContrastiveConfig(variant="v9"))
    )
    carft = exp.carft
    assert carft.correct.tolist() == [True, False]
    assert carft.lcs_length.tolist() == [4, 4]  # the prompt [1, 2], then [7, 9] and [7, 8] of [7, 8, 9]
    assert carft.gen_common[0].tolist() == [True, True, True, False, True]
    assert carft.ann_embeddings.shape == (2, 5, 2) and carft.ann_cot_mask.shape == (2, 5)
    assert "partial_reward" not in metrics and metrics["reward"] == pytest.approx(0.55)
    assert {"response_mask", "correct", "critic_token_values", "ann_common", "lcs_length"} <= set(
        exp.actor_batch(with_value_targets=False)
    )
    cot_only = ContrastiveConfig(variant="v9", lcs_cot_only=True)
    assert build_experience(rollout, annotated, results, _ppo_settings(contrastive=cot_only))[
        0
    ].carft.lcs_length.tolist() == [2, 2]


def test_carft_v11_partial_reward_and_the_diagnostics():
    rollout, annotated, results = _carft_case()
    exp, metrics = build_experience(
        rollout, annotated, results, _ppo_settings(contrastive=ContrastiveConfig(variant="v11"))
    )
    assert exp.carft.lcs_length is None  # no negative signal in v11
    # sample 1 is wrong but extractable: cos(z_ann = x, z_gen = y) = 0 -> 0.1 * 0 + 0.2
    assert metrics["partial_reward"] == pytest.approx(0.2) and metrics["reward"] == pytest.approx(0.6)
    # cos per sample: 1 (correct, above the 0.9 clamp: v4 does not act on it) and 0 (wrong)
    assert metrics["contrastive/cos_mean"] == pytest.approx(0.5)
    assert metrics["contrastive/cos_correct_mean"] == pytest.approx(1.0)
    assert metrics["contrastive/correct_under_clamp"] == 0.0
    assert metrics["contrastive/partial_reward_std"] == 0.0  # one wrong-but-extractable sample
    assert metrics["contrastive/partial_reward_min"] == pytest.approx(0.2)
    assert metrics["contrastive/cos_p10"] <= metrics["contrastive/cos_p50"] <= metrics["contrastive/cos_p90"]
