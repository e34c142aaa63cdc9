"""Final-answer extraction from N-CoT completions, and the numeric correctness test.

Recognised answer forms, tried in this order on the completion text:

1. The ReFT/CARFT trigger ``"the answer is"`` (case-insensitive, last occurrence), with an
   optional colon and an optional ``<...>`` wrapper, as in ``"Therefore, the answer is: 72"``
   (our target format) and ``"Therefore, the answer is <203>."`` (ReFT's svamp_nl data).
2. GSM8K's ``"#### 72"`` final line (last occurrence).

The number after the trigger may carry ``$``, thousands commas (``1,234``), a sign,
decimals, a trailing ``%`` (the number itself is kept: GSM8K and SVAMP gold answers to
percentage questions are the percentage, e.g. 25 for "25%"), or be a simple fraction
``3/4``. Nothing is guessed from elsewhere in the text: if no trigger is present the
completion is "not extractable", which ReFT rewards with 0.

Correctness is ``|pred - gold| <= tolerance`` with the ReFT tolerance 1e-2 by default.
"""

from __future__ import annotations

import math
import re

from carft_nemo.data.numbers import parse_number

DEFAULT_TOLERANCE = 1e-2

_TRIGGER = re.compile(r"the answer is\s*:?", re.IGNORECASE)
_GSM8K_TRIGGER = re.compile(r"####")


def _after_last(pattern: re.Pattern[str], text: str) -> str | None:
    matches = list(pattern.finditer(text))
    return text[matches[-1].end() :] if matches else None


def extract_ncot_answer(completion: str) -> float | None:
    """The final numeric answer of an N-CoT completion, or ``None`` if none is stated.

    Tries the ``"the answer is"`` trigger first, then GSM8K's ``"####"`` (see module doc).
    """
    for pattern in (_TRIGGER, _GSM8K_TRIGGER):
        tail = _after_last(pattern, completion)
        if tail is not None:
            value = parse_number(tail)
            if value is not None:
                return value
    return None


def to_number(value: object) -> float | None:
    """A program's return value as a float when it is a real number (bools excluded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def is_correct(prediction: float | None, gold: float, tolerance: float = DEFAULT_TOLERANCE) -> bool:
    """ReFT's correctness test: ``|prediction - gold| <= tolerance`` (``None`` is wrong)."""
    if prediction is None or not math.isfinite(prediction):
        return False
    return abs(prediction - gold) <= tolerance
