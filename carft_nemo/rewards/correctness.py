"""ReFT correctness reward, for N-CoT text and P-CoT programs, single and batched.

ReFT (Luong et al., 2024, Sec. 3.2) rewards a sampled response with

    r = 1    if the extracted answer equals the gold answer (|pred - gold| <= 1e-2),
    r = 0.1  if an answer is extractable but wrong (partial reward),
    r = 0    if no answer can be extracted (N-CoT) / the program fails (P-CoT).

CARFT (arXiv 2508.15868) replaces the flat 0.1 for wrong-but-extractable samples with a
similarity-based partial reward; that is computed elsewhere and plugged in here through
:data:`PartialReward`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from carft_nemo.data.records import Example
from carft_nemo.rewards.answer import DEFAULT_TOLERANCE, extract_ncot_answer, is_correct
from carft_nemo.rewards.sandbox import SandboxConfig, SandboxResult, run_programs

CORRECT_REWARD = 1.0
WRONG_REWARD = 0.1  # ReFT's flat partial reward
NO_ANSWER_REWARD = 0.0

PartialReward = Callable[[int, str, Example], float]
"""``(batch_index, completion, example) -> reward`` for a wrong-but-extractable sample."""


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """Reward of one completion.

    Attributes:
        reward: the scalar reward.
        correct: extracted value within tolerance of gold.
        extracted: a numeric answer was extracted (N-CoT) / returned (P-CoT).
        value: that answer, else ``None``.
        failure: why nothing was extracted (``"no_answer"`` or a sandbox status name), else ``None``.
    """

    reward: float
    correct: bool
    extracted: bool
    value: float | None
    failure: str | None


def _from_value(
    value: float | None, gold: float, failure: str | None, tolerance: float, wrong_reward: float
) -> RewardResult:
    if value is None:
        return RewardResult(NO_ANSWER_REWARD, False, False, None, failure)
    if is_correct(value, gold, tolerance):
        return RewardResult(CORRECT_REWARD, True, True, value, None)
    return RewardResult(wrong_reward, False, True, value, None)


def ncot_reward(
    completion: str, gold: float, *, tolerance: float = DEFAULT_TOLERANCE, wrong_reward: float = WRONG_REWARD
) -> RewardResult:
    """ReFT reward of an N-CoT completion (pure function of the text and the gold answer)."""
    value = extract_ncot_answer(completion)
    return _from_value(value, gold, "no_answer", tolerance, wrong_reward)


def pcot_reward(
    result: SandboxResult, gold: float, *, tolerance: float = DEFAULT_TOLERANCE, wrong_reward: float = WRONG_REWARD
) -> RewardResult:
    """ReFT reward of a P-CoT completion, given what its program returned in the sandbox."""
    value = result.value if result.ok else None
    return _from_value(value, gold, result.status.value, tolerance, wrong_reward)


def score_batch(
    completions: Sequence[str],
    examples: Sequence[Example],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    partial_reward: PartialReward | None = None,
    sandbox: SandboxConfig = SandboxConfig(),
) -> list[RewardResult]:
    """Rewards for ``completions[i]`` against ``examples[i]`` (style taken from the example).

    P-CoT programs run in parallel in the sandbox; N-CoT completions are parsed. For a
    wrong-but-extractable sample, ``partial_reward(i, completion, example)`` (CARFT) replaces
    ReFT's flat 0.1 when given.
    """
    if len(completions) != len(examples):
        raise ValueError(f"score_batch: {len(completions)} completions for {len(examples)} examples")
    pcot_idx = [i for i, ex in enumerate(examples) if ex.cot_style == "pcot"]
    sandboxed = dict(zip(pcot_idx, run_programs([completions[i] for i in pcot_idx], sandbox)))
    results = []
    for i, (text, ex) in enumerate(zip(completions, examples)):
        if i in sandboxed:
            res = pcot_reward(sandboxed[i], ex.answer, tolerance=tolerance)
        else:
            res = ncot_reward(text, ex.answer, tolerance=tolerance)
        if partial_reward is not None and res.extracted and not res.correct:
            res = dataclasses.replace(res, reward=float(partial_reward(i, text, ex)))
        results.append(res)
    return results
