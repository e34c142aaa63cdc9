"""Accuracy metrics used by ReFT / CARFT evaluation.

* Greedy accuracy: the share of questions whose single greedy answer is correct.
* Majority-vote accuracy (self-consistency, Wang et al. 2023; reported by ReFT as
  "voting@k"): k sampled answers per question; answers within ``tolerance`` of a group's
  first member join that group; the largest group wins; ties go to the group whose first
  member was sampled first (deterministic, order-based, no hashing). Unextractable
  answers (``None``) never vote; a question with no votes counts as wrong.
* Paired change between two evaluations of the same questions: how many answers were
  fixed and how many broken, with McNemar's exact test (a two-sided sign test on the
  questions that changed). On a few thousand questions a one-point move in accuracy is
  often noise; the flips say whether it is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from carft_nemo.rewards.answer import DEFAULT_TOLERANCE, is_correct


def greedy_accuracy(
    predictions: Sequence[float | None], golds: Sequence[float], tolerance: float = DEFAULT_TOLERANCE
) -> float:
    """Fraction of ``predictions[i]`` within ``tolerance`` of ``golds[i]`` (``None`` is wrong)."""
    if len(predictions) != len(golds):
        raise ValueError(f"greedy_accuracy: {len(predictions)} predictions for {len(golds)} golds")
    if not golds:
        return 0.0
    return sum(is_correct(p, g, tolerance) for p, g in zip(predictions, golds)) / len(golds)


def majority_vote(values: Sequence[float | None], tolerance: float = DEFAULT_TOLERANCE) -> float | None:
    """The winning answer among ``values`` (see module doc), or ``None`` if none voted."""
    groups: list[list[float]] = []  # in order of first appearance
    for value in values:
        if value is None:
            continue
        for group in groups:
            if abs(group[0] - value) <= tolerance:
                group.append(value)
                break
        else:
            groups.append([value])
    if not groups:
        return None
    # max() keeps the first of equal keys, i.e. the earliest-formed group wins ties.
    return max(groups, key=len)[0]


def majority_vote_accuracy(
    samples: Sequence[Sequence[float | None]], golds: Sequence[float], tolerance: float = DEFAULT_TOLERANCE
) -> float:
    """Fraction of questions whose :func:`majority_vote` over its k samples is correct."""
    if len(samples) != len(golds):
        raise ValueError(f"majority_vote_accuracy: {len(samples)} sample lists for {len(golds)} golds")
    votes = [majority_vote(s, tolerance) for s in samples]
    return greedy_accuracy(votes, golds, tolerance)


@dataclass(frozen=True)
class PairedChange:
    """Answers that flipped between two evaluations of the same questions."""

    compared: int  # questions in both evaluations
    fixed: int  # wrong before, right after
    broken: int  # right before, wrong after
    p_value: float  # McNemar's exact test: two-sided, under "a flip is equally likely either way"

    def as_dict(self) -> dict[str, int | float]:
        return {"compared": self.compared, "fixed": self.fixed, "broken": self.broken, "sign_test_p": self.p_value}


def sign_test_p(successes: int, failures: int) -> float:
    """Two-sided exact binomial p for ``successes`` vs ``failures`` at p = 1/2.

    P = min(1, 2 * sum_{i <= min(s, f)} C(n, i) / 2^n) with n = s + f; 1.0 when n = 0.
    Sums in exact integers (no overflow for n in the thousands); a p below the float range reads 0.
    """
    if successes < 0 or failures < 0:
        raise ValueError(f"sign_test_p: counts must be >= 0, got {successes}, {failures}")
    n = successes + failures
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(successes, failures) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_change(before: Mapping[str, bool], after: Mapping[str, bool]) -> PairedChange:
    """Flips from ``before`` to ``after`` (example id -> correct) over the ids both evaluated."""
    shared = before.keys() & after.keys()
    if not shared:
        raise ValueError("paired_change: the two evaluations share no example ids")
    fixed = sum(1 for k in shared if after[k] and not before[k])
    broken = sum(1 for k in shared if before[k] and not after[k])
    return PairedChange(len(shared), fixed, broken, sign_test_p(fixed, broken))
