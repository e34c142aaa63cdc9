"""ReFT reward values, the CARFT partial-reward plug-in, and the batch API."""

import pytest

from carft_nemo.data.records import Example
from carft_nemo.rewards.correctness import RewardResult, ncot_reward, pcot_reward, score_batch
from carft_nemo.rewards.sandbox import SandboxResult, SandboxStatus


def test_ncot_reward_levels():
    assert ncot_reward("... Therefore, the answer is: 7", 7.0) == RewardResult(1.0, True, True, 7.0, None)
    wrong = ncot_reward("Therefore, the answer is: 8", 7.0)
    assert (wrong.reward, wrong.correct, wrong.extracted, wrong.value) == (0.1, False, True, 8.0)
    none = ncot_reward("I do not know", 7.0)
    assert (none.reward, none.extracted, none.failure) == (0.0, False, "no_answer")
    assert ncot_reward("Therefore, the answer is: 7.3", 7.0, tolerance=0.5).correct


def test_pcot_reward_from_sandbox_result():
    assert pcot_reward(SandboxResult(SandboxStatus.OK, 7.0), 7.0).reward == 1.0
    assert pcot_reward(SandboxResult(SandboxStatus.OK, 6.0), 7.0).reward == pytest.approx(0.1)
    failed = pcot_reward(SandboxResult(SandboxStatus.TIMEOUT), 7.0)
    assert (failed.reward, failed.extracted, failed.failure) == (0.0, False, "TIMEOUT")


def test_score_batch_mixes_styles_and_plugs_partial_reward():
    examples = [
        Example("n1", "q", "", 7.0, "ncot"),
        Example("n2", "q", "", 7.0, "ncot"),
        Example("p1", "q", "", 21.0, "pcot"),
        Example("p2", "q", "", 21.0, "pcot"),
        Example("p3", "q", "", 21.0, "pcot"),
        Example("n3", "q", "", 7.0, "ncot"),
    ]
    completions = [
        "Therefore, the answer is: 7",
        "Therefore, the answer is: 5",
        "def solution():\n    return 3 * 7\n",
        "def solution():\n    return 20\n",
        "def solution():\n    raise ValueError('x')\n",
        "no answer here",
    ]
    seen = []

    def carft_partial(index, completion, example):
        seen.append((index, example.id))
        return 0.2 + index / 100

    results = score_batch(completions, examples, partial_reward=carft_partial)
    assert [r.reward for r in results] == pytest.approx([1.0, 0.21, 1.0, 0.23, 0.0, 0.0])
    assert seen == [(1, "n2"), (3, "p2")]  # only wrong-but-extractable samples
    assert results[4].failure == "EXCEPTION"
    flat = score_batch(completions, examples)
    assert [r.reward for r in flat] == pytest.approx([1.0, 0.1, 1.0, 0.1, 0.0, 0.0])
    with pytest.raises(ValueError):
        score_batch(completions[:2], examples)
