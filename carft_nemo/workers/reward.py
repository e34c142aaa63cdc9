"""The reward server: answer checking (N-CoT) and sandboxed program execution (P-CoT).

Stateless, so it scales out by adding workers: the controller runs ``reward.num_workers``
:class:`RewardWorker` s as a :class:`~carft_nemo.distributed.ray_group.WorkerGroup` of
independent replicas, each scoring a contiguous part of the batch, joined in order. Each
worker runs its P-CoT programs in parallel sandboxes (``SandboxConfig.max_workers``), started
when the worker starts, so a machine without an operating-system boundary for them fails
before the first rollout with the sandbox's own message (:class:`IsolationUnavailable`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from carft_nemo.data.records import Example
from carft_nemo.rewards.correctness import score_batch
from carft_nemo.rewards.sandbox import SandboxConfig, shared_pool


@dataclass(frozen=True)
class ScoredSample:
    """What the controller needs of a reward: the ReFT reward and its two flags."""

    reward: float
    correct: bool
    extracted: bool
    failure: str | None


class RewardWorker:
    """Implements :class:`~carft_nemo.workers.contracts.RewardScorer`."""

    def __init__(
        self, tolerance: float = 1e-2, sandbox: SandboxConfig = SandboxConfig(), runs_programs: bool = False
    ) -> None:
        self.tolerance = tolerance
        self.sandbox = sandbox
        if runs_programs:  # P-CoT: start the sandboxes now (N-CoT runs never need them)
            shared_pool(sandbox).start()

    def score(self, completions: Sequence[str], examples: Sequence[Example]) -> list[ScoredSample]:
        """ReFT's reward of each completion; see :meth:`RewardScorer.score`."""
        results = score_batch(completions, examples, tolerance=self.tolerance, sandbox=self.sandbox)
        return [ScoredSample(r.reward, r.correct, r.extracted, r.failure) for r in results]

    def process_id(self) -> int:
        return os.getpid()


__all__ = ["RewardWorker", "ScoredSample"]
