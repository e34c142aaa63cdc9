"""What the actor and critic workers share: one rank of a megatron model group in a Ray actor.

A worker holds its stage/shard of one model and answers calls from the controller with
plain CPU tensors (Ray moves them between processes). Batches arrive as this rank's
data-parallel shard, a dict of ``[B, ...]`` tensors; every rank of a model replica gets
the same shard. Forward results exist on the last pipeline stage only: other stages
return ``None`` and the controller reads the last stage (see
:class:`~carft_nemo.distributed.replicas.ReplicaMap`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from carft_nemo.data.batch import Batch, zero_outside
from carft_nemo.data.packing import PackingConfig
from carft_nemo.distributed import axes
from carft_nemo.distributed.collectives import all_reduce_sum_no_grad
from carft_nemo.distributed.layout import ParallelConfig
from carft_nemo.distributed.ray_group import ParallelWorker
from carft_nemo.models.cp_attention import gather_from_context_parallel
from carft_nemo.models.step import forward_backward, pack_microbatches
from carft_nemo.seeding import derive_seed
from carft_nemo.training.forward_backward import data_parallel_sum, run_forward_backward, split_microbatches
from carft_nemo.training.optim import TrainableModel
from carft_nemo.workers.contracts import ACTION_COLUMNS


def on_token_positions(batch: Batch) -> dict[str, torch.Tensor]:
    """The batch with every action column on the position that chooses it, and the targets.

    Action column j (``[B, T]``, :data:`~carft_nemo.workers.contracts.ACTION_COLUMNS`) is token
    j + 1, chosen at position j: one zero column on the right makes it ``[B, S]``, aligned with
    the logits and values of position j; ``targets [B, S]`` is the next token (0 at the last
    position, whose mask is 0). The losses then never shift inside, so a context-parallel
    rank's share of the positions holds everything its tokens need
    (:func:`carft_nemo.models.step.context_parallel_share`).
    """
    tokens = batch["tokens"]
    out = {k: torch.nn.functional.pad(v, (0, 1)) if k in ACTION_COLUMNS else v for k, v in batch.items()}
    out["targets"] = torch.nn.functional.pad(tokens[:, 1:], (0, 1))
    return out


def trim_microbatches(
    micro_batches: list[dict[str, torch.Tensor]], multiple: int = 1, *, same_width: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Cut the ``[b, S]`` tensors of each micro-batch after its longest row, by its ``lengths [b]``
    entry (dropped), rounded up to ``multiple``; ``same_width``: all at the longest of any
    (see ``collect_forward``)."""
    width = micro_batches[0]["tokens"].shape[1]
    longest = [int(micro["lengths"].max()) for micro in micro_batches]
    if same_width:
        longest = [max(longest)] * len(longest)
    cut = [min(width, -(-max(n, 1) // multiple) * multiple) for n in longest]
    return [
        {k: v[:, :keep] if v.dim() >= 2 and v.shape[1] == width else v for k, v in micro.items() if k != "lengths"}
        for micro, keep in zip(micro_batches, cut)
    ]


def _fit_columns(t: torch.Tensor, width: int) -> torch.Tensor:
    """A per-token output ``[b, s, ...]`` zero-padded (trimmed micro-batch) or cut (context-parallel
    padding) to ``width`` columns."""
    if t.dim() < 2 or t.shape[1] == width:
        return t
    if t.shape[1] > width:
        return t[:, :width]
    return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.shape[1]))


def _whole_rows(share: torch.Tensor, micro: dict[str, torch.Tensor], cp_size: int) -> torch.Tensor:
    """A per-token output of this context-parallel rank's positions as whole rows: unpacked ones
    arrive as the rank's chunks (a gather), packed ones full width (a sum of each rank's own
    positions; ``models.step.packed_context_parallel_share``)."""
    if "packed_tokens" not in micro:
        return gather_from_context_parallel(share, cp_size, axes.group("cp"))
    owned = micro["unpack_index"] < micro["packed_tokens"].numel()
    return all_reduce_sum_no_grad(zero_outside(share, owned), axes.group("cp"))


class ModelWorker(ParallelWorker):
    """Shared plumbing of the actor and critic: forward passes and epochs of mini-batch updates."""

    trainable: TrainableModel | None = None
    model: torch.nn.Module | None = None
    spec: Any = None  # the role's spec (``.parallel``, ``.micro_batch_size``), set by ``setup``

    def configure_process(self, cpu_threads: int) -> None:
        """Torch threads on CPU (several workers share the cores; see GenerationConfig.cpu_threads),
        and no per-load deprecation notices of torch.distributed.checkpoint in every actor's log."""
        import warnings

        from carft_nemo.distributed import device

        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch\.distributed\.checkpoint|megatron)")
        if not device.has_cuda():
            torch.set_num_threads(cpu_threads)

    def collect_forward(
        self,
        batch: Batch,
        outputs_fn: Callable[..., dict[str, torch.Tensor]],
        micro_batch_size: int,
        *,
        hidden_to_loss: bool = False,
    ) -> dict[str, torch.Tensor] | None:
        """Forward-only pass; ``outputs_fn(output, micro[, hidden])`` -> per-row tensors, concatenated.

        With a ``lengths [B]`` entry (real tokens per row), rows are grouped into micro-batches
        by length and each micro-batch runs only up to its longest row (rounded up to the
        layout's sequence multiple; with pipeline parallelism every micro-batch must have one
        width, so rows keep their order and all stop at the call's longest row): causal
        attention makes the cut columns invisible to the kept ones. Outputs come back in the
        caller's row order at the batch width, zero past each row's length. Returns CPU tensors
        on the last pipeline stage, ``None`` elsewhere.
        """

        cp_size = axes.size("cp")

        def loss_fn(output, micro, *hidden):
            produced = outputs_fn(output, micro, *hidden)
            if cp_size > 1:  # each rank scored its share of the positions; the caller gets whole rows
                produced = {k: _whole_rows(v, micro, cp_size) for k, v in produced.items()}
            return torch.zeros((), device=output.device), {k: v.float() for k, v in produced.items()}

        width = batch["tokens"].shape[1]
        same_width = self.layout is not None and self.layout.pipeline_parallel > 1
        parallel = self.spec.parallel if self.spec is not None else ParallelConfig()
        packing = self.packing
        order = None
        lengths = batch.get("lengths")
        if "lengths" in batch and not same_width and not packing.enabled:  # similar lengths share micro-batches
            order = torch.argsort(batch["lengths"], descending=True, stable=True)
            batch = {k: v[order] for k, v in batch.items()}
        micro_batches = split_microbatches(batch, micro_batch_size)
        if packing.enabled:  # the bins replace the trimming (carft_nemo.data.packing)
            micro_batches = pack_microbatches(
                micro_batches, packing.max_tokens, multiple=parallel.sequence_multiple, same_shape=same_width
            )
        elif "lengths" in batch:
            micro_batches = trim_microbatches(micro_batches, parallel.sequence_multiple, same_width=same_width)
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                per_micro = forward_backward(
                    model, micro_batches, loss_fn, forward_only=True, hidden_to_loss=hidden_to_loss
                )
        finally:
            model.train(was_training)
        if not per_micro:
            return None
        joined = {k: torch.cat([_fit_columns(m[k], width) for m in per_micro], dim=0).cpu() for k in per_micro[0]}
        if order is not None:
            joined = {k: torch.empty_like(v).index_copy_(0, order, v) for k, v in joined.items()}
        if lengths is not None:  # zeros past each row (whatever width its micro-batch ran at)
            real = torch.arange(width)[None, :] < lengths[:, None]
            joined = {k: zero_outside(v, real) for k, v in joined.items()}
        return joined

    def train_epochs(
        self,
        batch: Batch,
        *,
        epochs: int,
        mini_batch_rows: int,
        micro_batch_size: int,
        seed: int,
        make_loss: Callable[[dict[str, torch.Tensor], int], tuple[Callable, float]],
        hidden_to_loss: bool = False,
        lr_scale: float = 1.0,
    ) -> dict[str, float]:
        """``epochs`` passes over this rank's rows in ``mini_batch_rows`` mini-batches, one optimizer step each.

        ``make_loss(mini_batch, num_microbatches)`` returns ``(loss_fn, normalizer)`` for
        :func:`run_forward_backward`. The row order of each epoch is a function of ``seed``
        and the epoch (the same on every rank of a replica). Returns the metric sums of all
        mini-batches plus ``grad_norm`` (mean), ``updates_skipped`` and ``lr`` (the last step's,
        ``lr_scale`` included).
        """
        rows = next(iter(batch.values())).shape[0]
        if rows % mini_batch_rows:
            raise ValueError(f"{rows} rows per replica do not split into mini-batches of {mini_batch_rows}")
        totals: dict[str, float] = {}
        grad_norms, skipped, lr = [], 0, 0.0
        self.model.train()
        for epoch in range(epochs):
            order = torch.randperm(
                rows, generator=torch.Generator().manual_seed(derive_seed(seed, "epoch_order", epoch))
            )
            for lo in range(0, rows, mini_batch_rows):
                idx = order[lo : lo + mini_batch_rows]
                mini = {k: v[idx] for k, v in batch.items()}
                loss_fn, normalizer = make_loss(mini, mini_batch_rows // micro_batch_size)
                self.trainable.zero_grad()
                metrics = run_forward_backward(
                    self.model,
                    mini,
                    loss_fn=loss_fn,
                    normalizer=normalizer,
                    micro_batch_size=micro_batch_size,
                    hidden_to_loss=hidden_to_loss,
                    packing=self.packing,
                    sequence_multiple=self.spec.parallel.sequence_multiple if self.spec is not None else 1,
                )
                lr = self.trainable.lr * lr_scale
                ok, grad_norm = self.trainable.step(lr_scale)
                grad_norms.append(grad_norm)
                skipped += int(not ok)
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + v
        totals["grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
        totals["updates_skipped"] = float(skipped)
        totals["updates"] = float(len(grad_norms))
        totals["lr"] = lr
        return totals

    @property
    def packing(self) -> PackingConfig:
        """The role's packing settings (off for a spec without them)."""
        return getattr(self.spec, "packing", None) or PackingConfig()

    @staticmethod
    def global_count(mask: torch.Tensor) -> float:
        """Number of True entries of ``mask`` over the data-parallel group (the loss normaliser)."""
        return data_parallel_sum(mask.sum())


__all__ = ["ModelWorker", "on_token_positions", "trim_microbatches"]
