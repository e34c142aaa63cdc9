"""Greedy and majority-vote accuracy; paired change between two evaluations (flips, sign test)."""

import pytest

from carft_nemo.evaluation.metrics import (
    greedy_accuracy,
    majority_vote,
    majority_vote_accuracy,
    paired_change,
    sign_test_p,
)


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


# Hand-computed: n = 5, tail C(5,0) + C(5,1) = 6, p = 2 * 6 / 32; n = 5 all one way: 2 / 32;
# n = 6 split 3/3: the tail is 42 of 64, doubled above 1, so 1.
@pytest.mark.parametrize(
    "fixed, broken, p", [(1, 4, 0.375), (4, 1, 0.375), (5, 0, 0.0625), (3, 3, 1.0), (0, 0, 1.0), (10, 0, 2 / 1024)]
)
def test_sign_test_p_hand_values(fixed, broken, p):
    assert sign_test_p(fixed, broken) == pytest.approx(p)


def test_sign_test_p_large_counts_stay_finite_and_ordered():
    # session-5 run C1: 37 fixed, 103 broken -> far below 1e-4; 20 / 21 -> about 1.
    assert 0.0 < sign_test_p(37, 103) < 1e-4
    assert sign_test_p(20, 21) == pytest.approx(1.0)
    assert sign_test_p(1000, 1000) == 1.0
    assert sign_test_p(900, 1100) < sign_test_p(950, 1050) < 1.0
    with pytest.raises(ValueError):
        sign_test_p(-1, 3)


def test_paired_change_counts_flips_on_shared_ids():
    before = {"a": True, "b": False, "c": False, "d": True, "e": True}
    after = {"a": True, "b": True, "c": False, "d": False, "e": False, "only-after": True}
    change = paired_change(before, after)
    assert (change.compared, change.fixed, change.broken) == (5, 1, 2)
    assert change.p_value == pytest.approx(sign_test_p(1, 2))
    # fixed - broken is the change in correct answers: (3 -> 2 of 5 on the shared ids)
    assert change.fixed - change.broken == sum(after[k] for k in before) - sum(before.values())
    with pytest.raises(ValueError, match="share no example ids"):
        paired_change({"a": True}, {"b": True})
