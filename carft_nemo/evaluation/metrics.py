"""Accuracy metrics used by ReFT / CARFT evaluation.

* Greedy accuracy: the share of questions whose single greedy answer is correct.
* Majority-vote accuracy (self-consistency, Wang et al. 2023; reported by ReFT as
  "voting@k"): k sampled answers per question; answers within ``tolerance`` of a group's
  first member join that group; the largest group wins; ties go to the group whose first
  member was sampled first (deterministic, order-based, no hashing). Unextractable
  answers (``None``) never vote; a question with no votes counts as wrong.
"""

from __future__ import annotations

from typing import Sequence

from carft_nemo.rewards.answer import DEFAULT_TOLERANCE, is_correct


def greedy_accuracy(predictions: Sequence[float | None], golds: Sequence[float],
                    tolerance: float = DEFAULT_TOLERANCE) -> float:
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


def majority_vote_accuracy(samples: Sequence[Sequence[float | None]], golds: Sequence[float],
                           tolerance: float = DEFAULT_TOLERANCE) -> float:
    """Fraction of questions whose :func:`majority_vote` over its k samples is correct."""
    if len(samples) != len(golds):
        raise ValueError(f"majority_vote_accuracy: {len(samples)} sample lists for {len(golds)} golds")
    votes = [majority_vote(s, tolerance) for s in samples]
    return greedy_accuracy(votes, golds, tolerance)
