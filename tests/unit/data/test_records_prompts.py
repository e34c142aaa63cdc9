"""Example record validation and the ReFT/CARFT prompt/target text."""

import pytest

from carft_nemo.data.prompts import build_prompt, build_target, format_number
from carft_nemo.data.records import Example


def test_example_rejects_bad_style_and_answer():
    with pytest.raises(ValueError, match="cot_style"):
        Example("a", "q", "c", 1.0, "cot")
    with pytest.raises(ValueError, match="answer"):
        Example("a", "q", "c", float("nan"), "ncot")
    assert Example("a", "q", "c", 3, "ncot").answer == 3.0


def test_ncot_prompt_and_target_format():
    ex = Example("x", " Tom has 3 apples. ", "3 + 4 = 7.", 7.0, "ncot")
    assert build_prompt(ex) == "Question:\nTom has 3 apples.\nAnswer reasoning:\n"
    assert build_target(ex) == "3 + 4 = 7.\nTherefore, the answer is: 7"


def test_pcot_target_is_the_program():
    prog = "def solution():\n    return 2\n"
    ex = Example("x", "q", prog, 2.0, "pcot")
    assert build_target(ex) == prog.rstrip()
    assert build_prompt(ex).startswith("Question:\nq\nAnswer reasoning:\n")


@pytest.mark.parametrize(
    "value,text",
    [(203.0, "203"), (0.25, "0.25"), (-4.0, "-4"), (1 / 3, "0.333333"), (1e-9, "0"), (1234567.5, "1234567.5")],
)
def test_format_number(value, text):
    assert format_number(value) == text
