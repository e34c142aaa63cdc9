"""The reward server: answer checking (N-CoT) and sandboxed program execution (P-CoT).

Stateless, so it scales out by adding workers: :class:`RewardPool` splits a batch into
contiguous parts, one per worker, and joins the results in order. Each worker runs its
P-CoT programs in parallel sandbox processes (``SandboxConfig.max_workers``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from carft_nemo.data.records import Example
from carft_nemo.rewards.correctness import score_batch
from carft_nemo.rewards.sandbox import SandboxConfig


@dataclass(frozen=True)
class ScoredSample:
    """What the controller needs of a reward: the ReFT reward and its two flags."""

    reward: float
    correct: bool
    extracted: bool
    failure: str | None


class RewardWorker:
    def __init__(self, tolerance: float = 1e-2, sandbox: SandboxConfig = SandboxConfig()) -> None:
        self.tolerance = tolerance
        self.sandbox = sandbox

    def score(self, completions: Sequence[str], examples: Sequence[Example]) -> list[ScoredSample]:
        results = score_batch(completions, examples, tolerance=self.tolerance, sandbox=self.sandbox)
        return [ScoredSample(r.reward, r.correct, r.extracted, r.failure) for r in results]

    def process_id(self) -> int:
        import os

        return os.getpid()


class RewardPool:
    """``num_workers`` Ray actors of :class:`RewardWorker`."""

    def __init__(self, num_workers: int, tolerance: float, sandbox: SandboxConfig, *, num_cpus: float = 1) -> None:
        import ray

        remote = ray.remote(num_cpus=num_cpus, num_gpus=0)(RewardWorker)
        self.actors = [remote.remote(tolerance, sandbox) for _ in range(num_workers)]

    def submit(self, completions: Sequence[str], examples: Sequence[Example]) -> list[Any]:
        """Futures, one per worker, each scoring a contiguous part (see :meth:`join`)."""
        n = len(self.actors)
        per = -(-len(completions) // n)
        return [
            actor.score.remote(list(completions[i * per : (i + 1) * per]), list(examples[i * per : (i + 1) * per]))
            for i, actor in enumerate(self.actors)
        ]

    @staticmethod
    def join(parts: list[list[ScoredSample]]) -> list[ScoredSample]:
        return [s for part in parts for s in part]

    def pids(self) -> list[int]:
        import ray

        return ray.get([a.process_id.remote() for a in self.actors])

    def kill(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


__all__ = ["RewardPool", "RewardWorker", "ScoredSample"]
