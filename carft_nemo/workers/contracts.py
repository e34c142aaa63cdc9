"""What the controller may ask of each role's workers: methods, batch keys and shapes.

The controller calls workers through their groups with these protocols' functions
(``actor.submit_rows(PolicyWorker.forward, (batch,), outputs=...)``); the groups check the
name against the worker class. ``tests/unit/workers/test_contracts.py`` checks that every
worker class has each method with the protocol's parameters.

Shapes: ``B`` rows of this replica's part of the batch, ``S`` token positions,
``T = S - 1`` action columns (column ``j`` is token ``j + 1``), ``Sa`` annotated-CoT
positions, ``d`` the CARFT projection size. Batches are dicts of CPU tensors
(:data:`carft_nemo.data.batch.Batch`). Forward results exist on each replica's last
pipeline stage only (other ranks return ``None``; the group keeps the answering rank's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from carft_nemo.data.batch import Batch
    from carft_nemo.data.records import Example
    from carft_nemo.generation.config import GenerationConfig
    from carft_nemo.generation.rollout import Rollout
    from carft_nemo.workers.actor import ActorSpec
    from carft_nemo.workers.actor_loss import ActorTrainSettings
    from carft_nemo.workers.critic import CriticSpec, CriticTrainSettings
    from carft_nemo.workers.reward import ScoredSample

POLICY_OUTPUTS = ("logprobs", "values", "embeddings")
POLICY_WEIGHTS = ("policy", "reference")
# the [B, T] tensors of the training batches (one column per action; the workers move them onto
# the [B, S] positions that choose them: carft_nemo.workers.model_worker.on_token_positions)
ACTION_COLUMNS = ("action_mask", "old_logprobs", "advantages", "old_values", "returns")


class PolicyWorker(Protocol):
    """One rank of the actor group (:class:`~carft_nemo.workers.actor.ActorWorker`), or of the
    frozen reference group (built with ``ActorSpec.optim = None``)."""

    def setup(self, spec: ActorSpec) -> dict[str, Any]:
        """Build this rank's shard of the policy from the SFT checkpoint (plus the shared value
        head and the CARFT projection when asked); returns ``parameters_this_rank`` and
        ``vocab_size``."""

    def generate(self, prompts: list[list[int]], cfg: GenerationConfig) -> Rollout:
        """Sample one response per prompt (token ids) with ``cfg``; every rank of a replica
        gets the same prompts and returns the same rollout."""

    def forward(
        self, batch: Batch, *, outputs: tuple[str, ...] = ("logprobs",), weights: str = "policy"
    ) -> dict[str, Any] | None:
        """Per-token outputs without gradient.

        ``batch``: ``tokens [B, S]`` (long, right-padded), ``lengths [B]`` (real tokens per
        row: micro-batches stop at their longest row). ``outputs`` from
        :data:`POLICY_OUTPUTS`: ``logprobs [B, T]`` (log p of ``tokens[:, 1:]`` at the
        sampling temperature), ``values [B, S]`` (shared value head: V after reading token
        t), ``embeddings [B, S, d]`` (CARFT projection e_t). ``weights``: ``policy``, or
        ``reference`` for the frozen SFT weights kept in CPU memory (``reference.mode: swap``).
        Zero past each row's length.
        """

    def train(self, batch: Batch, settings: ActorTrainSettings) -> dict[str, float]:
        """``settings.epochs`` passes over the rows in mini-batches, one optimizer step each.

        ``batch``: :meth:`carft_nemo.rl.experience.Experience.actor_batch` (keys and shapes
        on :class:`~carft_nemo.rl.experience.Experience`). Returns metric sums over the
        mini-batches (``loss``, ``policy/*``, ``value/*``, ``contrastive/*``) plus
        ``grad_norm`` (mean), ``updates`` and ``updates_skipped``.
        """

    def evaluate(self, examples: list[Example], prompts: list[list[int]], cfg: GenerationConfig) -> dict[str, Any]:
        """Greedy accuracy on held-out ``examples`` (``prompts[i]`` their ids); the group's
        data-parallel replicas share the questions. Returns ``summary`` and per-example
        ``records``."""

    def save(self, root: str, step: int, data_state: dict[str, Any], metadata: dict[str, Any]) -> str:
        """Write ``<root>/step_<step>`` (weights, optimizer, LR schedule, RNG); collective."""

    def load(self, path: str) -> int:
        """Restore a checkpoint :meth:`save` wrote; returns its step; collective."""


class ValueWorker(Protocol):
    """One rank of the critic server group (:class:`~carft_nemo.workers.critic.CriticWorker`)."""

    def setup(self, spec: CriticSpec) -> dict[str, Any]:
        """Build this rank's shard of the value model: the SFT backbone with a fresh value head."""

    def forward(self, batch: Batch) -> dict[str, Any] | None:
        """``values [B, S]``, V after reading token t, for ``tokens [B, S]`` and ``lengths [B]``."""

    def train(self, batch: Batch, settings: CriticTrainSettings) -> dict[str, float]:
        """Clipped value loss over ``settings.epochs`` passes.

        ``batch``: :meth:`carft_nemo.rl.experience.Experience.critic_batch`: ``tokens [B, S]``,
        ``action_mask [B, T]``, ``old_values [B, T]``, ``returns [B, T]``. Returns metric sums
        (``value/*``) plus ``grad_norm``, ``updates``, ``updates_skipped``.
        """

    def save(self, root: str, step: int) -> str:
        """Write ``<root>/step_<step>``; collective."""

    def load(self, path: str) -> int:
        """Restore a checkpoint :meth:`save` wrote; returns its step; collective."""


class RewardScorer(Protocol):
    """One worker of the reward pool (:class:`~carft_nemo.workers.reward.RewardWorker`)."""

    def score(self, completions: list[str], examples: list[Example]) -> list[ScoredSample]:
        """ReFT's reward of each completion against its example's gold answer (P-CoT programs
        run in the sandbox), in order."""


__all__ = ["ACTION_COLUMNS", "POLICY_OUTPUTS", "POLICY_WEIGHTS", "PolicyWorker", "RewardScorer", "ValueWorker"]
