"""The critic server: one rank of the value-model group, with infer / train / save calls.

Initialised from the SFT checkpoint (the backbone) with a fresh, zero value head in place
of the LM output layer (:func:`carft_nemo.models.gpt.build_gpt_model` ``value_head=True``).
Its own parallel layout and optimizer; trained with the clipped value loss alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from carft_nemo.algorithms.ppo import clipped_value_loss
from carft_nemo.checkpoint.dist_checkpoint import POLICY_GROUP, load_checkpoint, load_model_weights, save_checkpoint
from carft_nemo.data.batch import Batch
from carft_nemo.data.packing import PackingConfig
from carft_nemo.distributed.layout import ParallelConfig
from carft_nemo.models.config import ModelConfig
from carft_nemo.models.gpt import build_gpt_model
from carft_nemo.training.optim import OptimConfig, make_trainable
from carft_nemo.workers.model_worker import ModelWorker, on_token_positions

CRITIC_GROUP = "critic"


@dataclass
class CriticSpec:
    """Everything a critic rank needs to build itself."""

    model: ModelConfig
    parallel: ParallelConfig
    optim: OptimConfig
    init_checkpoint: str  # SFT checkpoint: the backbone comes from its "policy" group
    total_steps: int = 1
    micro_batch_size: int = 8
    packing: PackingConfig = field(default_factory=PackingConfig)
    cpu_threads: int = 1


@dataclass
class CriticTrainSettings:
    """How the critic trains on one rollout (the actor's counterpart: ``ActorTrainSettings``)."""

    epochs: int
    mini_batch_rows: int  # rows per optimizer step on this replica
    seed: int  # the row order of each epoch derives from it
    value_clip: float = 0.2
    lr_scale: float = 1.0  # multiplies the scheduled LR (the collapse guard lowers it after a rollback)


def _values(output: torch.Tensor, micro: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"values": output.squeeze(-1)}


class CriticWorker(ModelWorker):
    """Implements :class:`~carft_nemo.workers.contracts.ValueWorker` (see it for batch keys and shapes)."""

    def setup(self, spec: CriticSpec) -> dict[str, Any]:
        """The SFT backbone with a fresh value head; see :meth:`ValueWorker.setup`."""
        self.spec = spec
        self.configure_process(spec.cpu_threads)
        gpt = build_gpt_model(spec.model, spec.parallel, value_head=True)
        load_model_weights(spec.init_checkpoint, POLICY_GROUP, gpt, skip_prefixes=("output_layer.",))
        self.trainable = make_trainable(gpt, spec.model, spec.parallel, spec.optim, spec.total_steps)
        self.model = self.trainable.model
        return {"parameters_this_rank": sum(p.numel() for p in gpt.parameters())}

    def forward(self, batch: Batch) -> dict[str, torch.Tensor] | None:
        """``values [B, S]``: V after reading token t (last stage; ``None`` elsewhere)."""
        return self.collect_forward(batch, _values, self.spec.micro_batch_size)

    def train(self, batch: Batch, settings: CriticTrainSettings) -> dict[str, float]:
        """Clipped value loss (token mean over the mini-batch); see :meth:`ValueWorker.train`."""

        def make_loss(mini: dict[str, torch.Tensor], num_micro: int):
            def loss_fn(output: torch.Tensor, micro: dict[str, torch.Tensor]):
                values = output.squeeze(-1).float()  # V at position j: the state of action column j
                return clipped_value_loss(
                    values, micro["old_values"], micro["returns"], micro["action_mask"].bool(), settings.value_clip
                )

            return loss_fn, self.global_count(mini["action_mask"])

        return self.train_epochs(
            on_token_positions(batch),
            epochs=settings.epochs,
            mini_batch_rows=settings.mini_batch_rows,
            micro_batch_size=self.spec.micro_batch_size,
            seed=settings.seed,
            make_loss=make_loss,
            lr_scale=settings.lr_scale,
        )

    def save(self, root: str, step: int) -> str:
        """Write ``<root>/step_<step>``; see :meth:`ValueWorker.save`."""
        return str(save_checkpoint(root, step, {CRITIC_GROUP: self.trainable}))

    def load(self, path: str) -> int:
        """Restore a checkpoint; see :meth:`ValueWorker.load`."""
        return load_checkpoint(path, {CRITIC_GROUP: self.trainable}).step


__all__ = ["CRITIC_GROUP", "CriticSpec", "CriticTrainSettings", "CriticWorker"]
