"""A training batch through megatron's pipeline schedule with layout-invariant loss scaling.

Every trainer (SFT, PPO actor, critic) has the same plumbing: split the rank's batch into
micro-batches of equal length (pipeline stages exchange fixed-shape activations), run
:func:`carft_nemo.models.step.forward_backward` (1F1B under pipeline parallelism), and
reduce the metrics that only the last stage computes.

Loss normalisation: a trainer's ``loss_fn`` returns a *sum* over its micro-batch and the
global normaliser N (e.g. the number of loss tokens in the whole data-parallel batch) is
passed in. We scale each micro-batch loss by ``dp * num_microbatches / N`` because the
schedule divides by the number of micro-batches and DDP averages gradients over data
parallel ranks: the net gradient is exactly that of ``sum / N`` over the global batch, for
any layout. With context parallelism each rank's loss covers its share of the tokens (the
schedule's factor C and DDP's average over data x context parallel cancel). That is what
makes TP/PP/DP/CP runs and resumed runs agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from carft_nemo.data.batch import Batch
from carft_nemo.data.packing import PackingConfig
from carft_nemo.distributed import axes, device
from carft_nemo.distributed.collectives import all_reduce_sum_no_grad
from carft_nemo.models.step import LossFn, forward_backward, pack_microbatches


def split_microbatches(batch: Batch, micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Split every ``[B, ...]`` tensor of the batch into chunks of ``micro_batch_size`` rows."""
    sizes = {k: v.shape[0] for k, v in batch.items()}
    total = next(iter(sizes.values()))
    if any(s != total for s in sizes.values()):
        raise ValueError(f"batch tensors disagree on the batch dimension: {sizes}")
    if total % micro_batch_size:
        raise ValueError(f"batch of {total} rows is not divisible by micro_batch_size={micro_batch_size}")
    dev = device.local_device()
    return [
        {k: v[i : i + micro_batch_size].to(dev) for k, v in batch.items()} for i in range(0, total, micro_batch_size)
    ]


def data_parallel_sum(value: torch.Tensor | float) -> float:
    """Sum a scalar over the data-parallel group (1 rank: itself)."""
    tensor = torch.as_tensor(value, dtype=torch.float64).to(device.local_device())
    group = axes.group("dp")
    return float(all_reduce_sum_no_grad(tensor, group))


def run_forward_backward(
    model: torch.nn.Module,
    batch: Batch,
    *,
    loss_fn: LossFn,
    normalizer: float,
    micro_batch_size: int,
    forward_only: bool = False,
    hidden_to_loss: bool = False,
    packing: PackingConfig | None = None,
    sequence_multiple: int = 1,
) -> dict[str, float]:
    """Forward (and backward unless ``forward_only``) of this rank's batch (``tokens [B, S]``, ...).

    ``loss_fn(output, micro_batch)`` returns a loss *sum* and metric sums; the batch-level
    result (identical on every rank of the model group: the last pipeline stage's values
    are broadcast, then summed over data parallel) has every metric sum plus
    ``"loss"`` = loss sum / ``normalizer``. With ``hidden_to_loss`` the loss function also
    receives the final hidden states ``[s, b, h]`` (see :func:`~carft_nemo.models.step.forward_backward`).
    ``packing`` runs the model on each micro-batch's rows packed into bins (the loss still sees
    rows: :mod:`carft_nemo.data.packing`); ``sequence_multiple`` rounds the bins for TP/CP.
    """
    microbatches = split_microbatches(batch, micro_batch_size)
    if packing is not None and packing.enabled:
        microbatches = pack_microbatches(
            microbatches, packing.max_tokens, multiple=sequence_multiple, same_shape=axes.size("pp") > 1
        )
    # DDP averages gradients over data x context parallel, and megatron's schedule multiplies a
    # (loss, metrics) loss by the context-parallel size: a context-parallel rank's loss, its tokens'
    # share of the sum, needs no factor of its own (tests/distributed/test_context_parallel.py).
    scale = axes.size("dp") * len(microbatches) / max(normalizer, 1e-12)

    def scaled_loss(
        output: torch.Tensor, micro: Batch, *hidden: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss_sum, metrics = loss_fn(output, micro, *hidden)
        return loss_sum * scale, {**metrics, "loss_sum": loss_sum.detach()}

    outputs = forward_backward(
        model, microbatches, scaled_loss, forward_only=forward_only, hidden_to_loss=hidden_to_loss
    )
    return _share_last_stage_metrics(outputs, normalizer)


def _share_last_stage_metrics(outputs: Sequence[dict[str, torch.Tensor]], normalizer: float) -> dict[str, float]:
    """Sum the micro-batch metrics on the last stage, all-reduce over DP, broadcast over PP."""
    keys = sorted(outputs[0].keys()) if outputs else []
    if axes.size("pp") > 1:  # only the last stage has outputs
        last = axes.last_stage_rank()
        group = axes.group("pp")
        names = [keys]
        torch.distributed.broadcast_object_list(names, src=last, group=group)
        keys = names[0]
    if axes.is_last_stage():
        local = torch.tensor([float(sum(o[k] for o in outputs)) for k in keys], dtype=torch.float64)
    else:
        local = torch.zeros(len(keys), dtype=torch.float64)
    local = local.to(device.local_device())
    if axes.size("pp") > 1:
        torch.distributed.broadcast(local, src=axes.last_stage_rank(), group=axes.group("pp"))
    if local.numel():  # context-parallel ranks hold shares of each sum: add them too
        local = all_reduce_sum_no_grad(local, axes.group("dp_cp"))
    result = dict(zip(keys, local.tolist()))
    if "loss_sum" in result:
        result["loss"] = result["loss_sum"] / max(normalizer, 1e-12)
    return result
