"""Numbers as math word-problem data and answers write them: ``$1,234``, ``-3.5``, ``3/4``, ``25%``."""

from __future__ import annotations

import math
import re

# A number, with optional sign / currency / thousands commas / decimals, then an optional
# "/denominator" (simple fraction) and an optional percent sign.
_NUMBER = re.compile(
    r"""^\s*<?\s*\$?\s*
    (?P<sign>[-+\u2212]?)\s*\$?\s*
    (?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)
    (?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?
    \s*%?""",
    re.VERBOSE,
)


def parse_number(text: str) -> float | None:
    """Parse the number at the start of ``text`` (after optional ``<``/``$``/sign).

    Returns ``None`` when ``text`` does not start with a number or the value is not
    finite (e.g. a zero denominator).
    """
    match = _NUMBER.match(text)
    if match is None:
        return None
    value = float(match.group("num").replace(",", ""))
    if match.group("den") is not None:
        den = float(match.group("den"))
        if den == 0:
            return None
        value /= den
    if match.group("sign") in ("-", "\u2212"):
        value = -value
    return value if math.isfinite(value) else None


__all__ = ["parse_number"]
