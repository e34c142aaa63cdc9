"""Wall-clock time of a step's named phases, one mechanism for every stage.

timer = PhaseTimer()
with timer.phase("generation"):
    ...
timer.record("critic", seconds)   # a phase measured elsewhere (calls that overlap)
metrics.update(timer.metrics())   # {"time/generation": ..., "time/critic": ..., "step_time_s": ...}
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class PhaseTimer:
    """Seconds per named phase, and the time since the timer was made."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as ``name`` (recorded also when it raises)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.record(name, time.perf_counter() - t0)

    def record(self, name: str, seconds: float) -> None:
        self.seconds[name] = seconds

    def elapsed(self) -> float:
        """Seconds since the timer was made."""
        return time.perf_counter() - self.started

    def metrics(self) -> dict[str, float]:
        """``time/<phase>`` for every phase and ``step_time_s`` (the whole span so far)."""
        return {**{f"time/{k}": v for k, v in self.seconds.items()}, "step_time_s": self.elapsed()}


__all__ = ["PhaseTimer"]
