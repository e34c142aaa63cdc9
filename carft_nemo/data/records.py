"""The one record type every data source is converted into.

A math word problem with its annotated chain of thought (CoT) and numeric gold answer, in
either natural-language form (N-CoT) or program form (P-CoT, a ReFT-style
``def solution(): ... return result``).
"""

from __future__ import annotations

import dataclasses
import math

COT_STYLES: tuple[str, ...] = ("ncot", "pcot")


@dataclasses.dataclass(frozen=True)
class Example:
    """One annotated problem.

    Attributes:
        id: stable identifier (``"gsm8k-train-17"``, ``"svamp_0"``, ``"synthetic-train-3"``).
        question: the problem text as shown to the model.
        cot: the annotated CoT *without* the final answer sentence (N-CoT), or the whole
            program (P-CoT); :func:`carft_nemo.data.prompts.build_target` adds the rest.
        answer: the gold numeric answer.
        cot_style: ``"ncot"`` or ``"pcot"``.
    """

    id: str
    question: str
    cot: str
    answer: float
    cot_style: str

    def __post_init__(self) -> None:
        # Fail at construction: a bad record found later (mid-rollout) costs a whole run.
        if self.cot_style not in COT_STYLES:
            raise ValueError(f"Example.cot_style: must be one of {COT_STYLES}, got {self.cot_style!r}")
        if not isinstance(self.answer, (int, float)) or not math.isfinite(self.answer):
            raise ValueError(f"Example.answer: must be a finite number, got {self.answer!r} (id={self.id})")
        object.__setattr__(self, "answer", float(self.answer))
