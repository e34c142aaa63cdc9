"""N-CoT answer extraction forms and the tolerance test."""

import pytest

from carft_nemo.data.numbers import parse_number
from carft_nemo.rewards.answer import extract_ncot_answer, is_correct, to_number


@pytest.mark.parametrize(
    "text,value",
    [
        ("so 3 + 4 = 7.\nTherefore, the answer is: 7", 7.0),
        ("Therefore, the answer is <203>.", 203.0),
        ("Natalia sold 72 clips.\n#### 72", 72.0),
        ("#### 1,234,567", 1234567.0),
        ("The answer is: -12.5", -12.5),
        ("the answer is \u221212", -12.0),
        ("Therefore, the answer is <25%>.", 25.0),
        ("Therefore, the answer is: $1,000.50 in total", 1000.5),
        ("the answer is 3/4", 0.75),
        ("THE ANSWER IS: .5", 0.5),
        ("the answer is 3. Later: the answer is 5", 5.0),  # last trigger wins
        ("#### 8\nTherefore, the answer is: 9", 9.0),  # trigger preferred over ####
    ],
)
def test_extracts(text, value):
    assert extract_ncot_answer(text) == pytest.approx(value)


@pytest.mark.parametrize(
    "text",
    [
        "3 + 4 = 7",
        "",
        "Therefore, the answer is: unknown",
        "the answer is 1/0",
        "#### ",
        "answer: 7",
    ],
)
def test_not_extractable(text):
    assert extract_ncot_answer(text) is None


def test_tolerance_default_and_configurable():
    assert is_correct(7.009, 7.0)
    assert not is_correct(7.011, 7.0)
    assert is_correct(7.4, 7.0, tolerance=0.5)
    assert not is_correct(None, 7.0)
    assert not is_correct(float("inf"), 7.0)


def test_parse_number_and_to_number():
    assert parse_number("<1,000>") == 1000.0
    assert parse_number("abc") is None
    assert to_number(True) is None and to_number("3") is None and to_number(float("nan")) is None
    assert to_number(3) == 3.0
