"""Greedy and majority-vote accuracy."""

import pytest

from carft_nemo.evaluation.metrics import greedy_accuracy, majority_vote, majority_vote_accuracy


def test_greedy_accuracy():
    assert greedy_accuracy([1.0, 2.005, None, 4.0], [1.0, 2.0, 3.0, 5.0]) == pytest.approx(0.5)
    assert greedy_accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        greedy_accuracy([1.0], [1.0, 2.0])


def test_majority_vote_groups_within_tolerance():
    # 3.001 and 3.0 form one group of 3 (with 2.999) against two 5s.
    assert majority_vote([5.0, 3.0, 3.001, 5.0, 2.999, None, None, None]) == pytest.approx(3.0)


def test_majority_vote_tie_break_is_first_seen_and_deterministic():
    assert majority_vote([4.0, 7.0, 7.0, 4.0]) == 4.0
    assert majority_vote([7.0, 4.0, 4.0, 7.0]) == 7.0
    assert majority_vote([None, None]) is None


def test_majority_vote_accuracy():
    samples = [[1.0, 1.0, 2.0], [3.0, 4.0, 4.0], [None, None, 9.0], [None]]
    golds = [1.0, 3.0, 9.0, 0.0]
    assert majority_vote_accuracy(samples, golds) == pytest.approx(0.5)
