"""Prompt and target text in the ReFT / CARFT format.

ReFT (Luong et al., 2024) and CARFT (arXiv 2508.15868) train on
``"Question:\\n{question}\\nAnswer reasoning:\\n"`` followed by the response. For N-CoT the
response is the CoT then ``"\\nTherefore, the answer is: {value}"``; for P-CoT it is the
program alone (the answer is what ``solution()`` returns). EOS is appended by the tokenizer
step, not here, so the text stays tokenizer-independent.
"""

from __future__ import annotations

from carft_nemo.data.records import Example

PROMPT_TEMPLATE = "Question:\n{question}\nAnswer reasoning:\n"
ANSWER_TRIGGER = "Therefore, the answer is:"


def format_number(value: float) -> str:
    """Shortest plain decimal text for ``value``: ``203.0 -> "203"``, ``0.25 -> "0.25"``.

    Integers print without a fraction; others with at most 6 decimals (gold answers are
    compared with tolerance 1e-2, so more digits only lengthen the target).
    """
    if abs(value - round(value)) < 1e-9:
        return str(int(round(value)))
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def build_prompt(example: Example) -> str:
    """The prompt the policy is conditioned on (same header for N-CoT and P-CoT)."""
    return PROMPT_TEMPLATE.format(question=example.question.strip())


def answer_sentence(value: float) -> str:
    """The N-CoT closing line, ``"Therefore, the answer is: 72"``."""
    return f"{ANSWER_TRIGGER} {format_number(value)}"


def build_target(example: Example) -> str:
    """The gold response text without EOS: CoT + answer line (N-CoT) or the program (P-CoT)."""
    if example.cot_style == "pcot":
        return example.cot.rstrip()
    return f"{example.cot.rstrip()}\n{answer_sentence(example.answer)}"
