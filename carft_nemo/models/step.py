"""One forward(+backward) pass over micro-batches through megatron's pipeline schedules.

``get_forward_backward_func()`` picks the schedule for the current layout: plain
gradient accumulation without pipeline parallelism, 1F1B with it. The schedule calls our
``forward_step`` per micro-batch; only the last pipeline stage has an output to score, so
the caller's ``loss_fn`` runs there and its metrics come back from that stage only.

The schedule divides the loss it back-propagates by the number of micro-batches, so the
gradient is that of the mean loss over micro-batches. It also modifies returned tensors in
place, hence metrics are detached copies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from carft_nemo import compat
from carft_nemo.data.batch import Batch, zero_outside
from carft_nemo.data.packing import pack, plan, row_lengths, unpack
from carft_nemo.distributed import axes
from carft_nemo.models.cp_attention import chunk_positions, split_for_context_parallel
from carft_nemo.models.forward import (
    capture_final_hidden,
    causal_inputs,
    packed_inputs,
    per_token_rotary_positions,
    thd_sequences,
)
from carft_nemo.models.logprobs import token_logprobs

# loss_fn(model_output [b, s, V/tp] or [b, s, 1], micro_batch) -> (scalar loss, metrics)
LossFn = Callable[[torch.Tensor, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _forward_step(
    loss_fn: LossFn, capture_hidden: bool, hidden_to_loss: bool, batches: Iterator[Batch], model: torch.nn.Module
):
    batch = next(batches)
    packed = "packed_tokens" in batch
    cp_size = axes.size("cp")
    if cp_size > 1:
        share = packed_context_parallel_share if packed else context_parallel_share
        batch = share(batch, cp_size, axes.rank("cp"))
    extra = {}
    if packed and compat.transformer_engine_available():  # TE's THD: one stream, sequences by cu_seqlens
        tokens, positions = batch["packed_tokens"].reshape(1, -1), batch["packed_positions"].reshape(1, -1)
        mask, rope = None, contextlib.nullcontext()
        extra["packed_seq_params"] = thd_sequences(batch["packed_segments"])
    elif packed:  # the model runs on the bins; the loss sees rows again (carft_nemo.data.packing)
        tokens, positions = batch["packed_tokens"], batch["packed_positions"]
        mask = packed_inputs(batch["packed_segments"])
        rope = per_token_rotary_positions(model, positions)
    else:
        tokens = batch["tokens"]
        positions, mask = causal_inputs(tokens)
        rope = contextlib.nullcontext()
    with rope:
        if capture_hidden or hidden_to_loss:
            with capture_final_hidden(model) as cap:
                output = model(tokens, positions, mask, **extra)
            hidden = cap.get("hidden")
        else:
            output, hidden = model(tokens, positions, mask, **extra), None

    def score(out: torch.Tensor):
        rows_hidden = hidden
        if packed:
            out = unpack(out, batch["unpack_index"])
            if hidden is not None:
                rows_hidden = unpack(hidden.transpose(0, 1), batch["unpack_index"]).transpose(0, 1)
        loss, metrics = loss_fn(out, batch, rows_hidden) if hidden_to_loss else loss_fn(out, batch)
        metrics = {k: v.detach().clone() for k, v in metrics.items()}
        if capture_hidden and rows_hidden is not None:
            metrics["hidden"] = rows_hidden.detach().transpose(0, 1).clone()  # [b, s, h]
        return loss, metrics

    return output, score


ANNOTATED_PREFIX = "ann_"  # per-token tensors of CARFT's annotated sequences: their own width Sa


def context_parallel_share(batch: Batch, cp_size: int, cp_rank: int) -> dict[str, torch.Tensor]:
    """This context-parallel rank's chunks (r and 2C-1-r) of every per-token ``[b, S, ...]`` tensor.

    Per-token tensors are those whose dim 1 is the tokens' width, and the annotated sequences'
    (keys starting with ``ann_``, split along their own width). Per-row ``[b]`` values stay
    whole. Each is zero-padded on the right to a multiple of 2C first (masks are then 0 there).
    The model then runs on the rank's tokens (RoPE and attention place them by their global
    positions) and the loss sees only them: per-token targets must be aligned with the position
    that predicts them before the split (SFT's ``labels``, the RL batches of
    :func:`carft_nemo.workers.model_worker.on_token_positions`), never shifted inside the loss.
    """
    width = batch["tokens"].shape[1]

    def per_token(key: str, v: torch.Tensor) -> bool:
        return v.dim() >= 2 and (key.startswith(ANNOTATED_PREFIX) or v.shape[1] == width)

    return {k: _padded_share(v, cp_size, cp_rank) if per_token(k, v) else v for k, v in batch.items()}


def _padded_share(v: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Chunks r and 2C-1-r along dim 1, after zero padding to a multiple of 2C (masks are 0 there)."""
    length = v.shape[1]
    padded = -(-length // (2 * cp_size)) * (2 * cp_size)
    if padded != length:
        v = torch.nn.functional.pad(v, (0, 0) * (v.dim() - 2) + (0, padded - length))
    return split_for_context_parallel(v, cp_size, cp_rank)


def packed_context_parallel_share(batch: Batch, cp_size: int, cp_rank: int) -> dict[str, torch.Tensor]:
    """A packed micro-batch's share for this context-parallel rank: chunks r and 2C-1-r of every bin.

    The model runs on the rank's chunks of the bins (their tokens and positions); the bins'
    segments stay whole (the attention core indexes the whole-bin mask at the rank's queries
    and the gathered keys). Outputs unpack to full-width rows holding this rank's positions
    (``unpack_index`` remapped; zeros elsewhere), and every row-aligned per-token tensor of the
    batch (masks, targets, advantages, ...) is zeroed where another rank holds the position, so
    each loss is this rank's share of its token sums and of CARFT's pooled partial sums. The
    price: per-token outputs (the logits) take full-width rows' memory, as unpacked rows do.
    Annotated (``ann_``) tensors split along their own width as in :func:`context_parallel_share`.
    """
    n_bins, budget = batch["packed_tokens"].shape
    local = budget // cp_size
    owned_positions = chunk_positions(local, cp_size, cp_rank, batch["packed_tokens"].device)  # in each bin
    # flat whole-bin index -> flat local index (the sentinel n_bins * budget -> n_bins * local)
    local_of = torch.full((n_bins * budget + 1,), n_bins * local, dtype=torch.long, device=owned_positions.device)
    bins = torch.arange(n_bins, device=owned_positions.device)[:, None]
    local_of[(bins * budget + owned_positions[None, :]).reshape(-1)] = torch.arange(n_bins * local, device=bins.device)
    unpack_index = local_of[batch["unpack_index"]]
    owned = unpack_index < n_bins * local  # [b, S]
    width = batch["tokens"].shape[1]
    out = {}
    for key, v in batch.items():
        if key in ("packed_tokens", "packed_positions") or key.startswith(ANNOTATED_PREFIX):
            out[key] = _padded_share(v, cp_size, cp_rank) if v.dim() >= 2 else v
        elif key == "unpack_index":
            out[key] = unpack_index
        elif key != "packed_segments" and v.dim() >= 2 and v.shape[1] == width:
            out[key] = zero_outside(v, owned)
        else:
            out[key] = v
    return out


def pack_microbatches(
    micro_batches: Sequence[Batch], max_tokens: int, *, multiple: int = 1, same_shape: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Each micro-batch with its packed tensors added (``max_tokens`` 0: the micro-batch's width).

    ``same_shape`` (pipeline parallelism: stages exchange fixed-shape activations): every
    micro-batch gets the same number of bins of the same budget.
    """
    if compat.transformer_engine_available() and axes.size("cp") > 1:
        # TE's THD path splits each sequence of the stream over the CP ranks (per-sequence chunks);
        # our CP share splits each bin as one sequence, which TE's attention does not take
        raise RuntimeError(
            "packing.enabled with context_parallel > 1 on Transformer Engine: TE's THD layout needs each "
            "packed sequence split over the context-parallel ranks, which is not wired; turn one of them off"
        )
    budgets = [max_tokens or m["tokens"].shape[1] for m in micro_batches]
    if same_shape:
        budgets = [max(budgets)] * len(budgets)
    lengths = [row_lengths(m) for m in micro_batches]
    plans = [plan(n, b, multiple) for n, b in zip(lengths, budgets)]
    min_bins = max(len(bins) for _, bins in plans) if same_shape else 0
    return [
        {**m, **pack(m["tokens"], n, budget, bins, min_bins=min_bins)}
        for m, n, (budget, bins) in zip(micro_batches, lengths, plans)
    ]


def forward_backward(
    model: torch.nn.Module,
    micro_batches: Sequence[Batch],
    loss_fn: LossFn,
    *,
    forward_only: bool = False,
    capture_hidden: bool = False,
    hidden_to_loss: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Run the layout's schedule over ``micro_batches`` (each with ``tokens [b, s]``).

    Gradients accumulate into the model (call ``TrainableModel.zero_grad()`` first and
    ``.step()`` after). Returns one metrics dict per micro-batch on the last pipeline stage
    (``[]`` on other stages); ``capture_hidden`` adds the final normed hidden states
    ``"hidden" [b, s, h]``. ``hidden_to_loss`` calls ``loss_fn(output, batch, hidden)`` with the
    final hidden states ``[s, b, h]`` still in the graph (heads on them, e.g. CARFT's projection
    and a shared value head, then train with the model).
    """
    if not micro_batches:
        raise ValueError("forward_backward needs at least one micro-batch")
    key = "packed_tokens" if "packed_tokens" in micro_batches[0] else "tokens"
    b, s = micro_batches[0][key].shape
    if key == "packed_tokens" and compat.transformer_engine_available():
        b, s = 1, b * s  # TE's THD stream: the bins back to back
    cp = axes.size("cp")
    s = -(-s // (2 * cp)) * 2 if cp > 1 else s  # what pipeline stages exchange per micro-batch: this rank's share
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, loss_fn, capture_hidden, hidden_to_loss),
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=s,
        micro_batch_size=b,
        forward_only=forward_only,
    )


def lm_loss(temperature: float = 1.0) -> LossFn:
    """Next-token loss L = -mean_t log p_T(y_t) with ``labels [b, s]``; metrics: loss, logprobs."""

    def loss_fn(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logp = token_logprobs(logits, batch["labels"], temperature)
        loss = -logp.mean()
        return loss, {"loss": loss, "logprobs": logp}

    return loss_fn


__all__ = ["Batch", "LossFn", "forward_backward", "lm_loss"]
