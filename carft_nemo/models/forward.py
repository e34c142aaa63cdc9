"""Inputs for a causal forward pass and access to the final hidden states."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from megatron.core.models.gpt import GPTModel


def causal_inputs(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids ``[b, s]`` and megatron's boolean attention mask ``[1, 1, s, s]`` (True = hidden).

    Sequences are right-padded, so a plain causal mask is exact for every real token:
    padding only ever follows the tokens that matter.
    """
    b, s = tokens.shape
    positions = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, -1)
    mask = torch.ones(s, s, dtype=torch.bool, device=tokens.device).triu(1).view(1, 1, s, s)
    return positions, mask


def packed_inputs(segments: torch.Tensor) -> torch.Tensor:
    """Megatron's boolean mask ``[n, 1, s, s]`` (True = hidden) for packed rows (``carft_nemo.data.packing``).

    A token sees the earlier tokens of its own segment only; a bin's unused tail
    (segment -1) sees itself, so no softmax row is empty.
    """
    s = segments.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).triu(1)
    other = segments.unsqueeze(2) != segments.unsqueeze(1)
    hidden = causal.unsqueeze(0) | other
    hidden &= ~torch.eye(s, dtype=torch.bool, device=segments.device).unsqueeze(0)
    return hidden.unsqueeze(1)


def thd_sequences(segments: torch.Tensor):
    """Transformer Engine's packed (THD) layout of bins ``[n, budget]``: megatron's ``PackedSeqParams``.

    The bins run as one stream of ``n * budget`` tokens; every run of one segment is a sequence
    (a bin's unused tail, segment -1, is one too), so ``cu_seqlens`` marks where each starts and
    TE's attention and megatron's RoPE restart there (each sequence at position 0).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    n, budget = segments.shape
    flat = segments.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::budget] = True  # a bin boundary ends a sequence even when the next bin's segment is equal
    cu = torch.cat([starts.nonzero().squeeze(1), torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)  # fmt: skip


@contextlib.contextmanager
def per_token_rotary_positions(model: torch.nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Rotary embeddings at ``positions [b, s]`` instead of ``0 .. s-1`` for every row.

    megatron-core's GPTModel derives RoPE from the sequence length alone (``position_ids`` feed
    only learned absolute embeddings), so packed rows would continue each other's positions.
    RoPE's attention scores depend on relative positions only, so that changes them by rounding
    alone; with each token's own position (its rotary module returns the frequencies of each
    token's position as ``[s, b, 1, d]``, which the attention's RoPE broadcasts per row) a
    packed row is the same computation as the unpacked one, as far from the long-context
    positions a row never reached.
    """
    gpt = unwrap(model)
    rotary = getattr(gpt, "rotary_pos_emb", None)
    if rotary is None:  # no RoPE (an intermediate pipeline stage still has the module; learned embeddings use ids)
        yield
        return
    original = rotary.forward

    def at_positions(*args, **kwargs):
        # the whole table (its forward would keep a context-parallel rank's chunks of it): the
        # positions are the rank's own tokens' already
        table = rotary.get_emb(int(positions.max()) + 1)  # [max_pos + 1, 1, 1, d]
        return table[positions.t()].squeeze(2)  # [s, b, 1, d]

    rotary.forward = at_positions
    try:
        yield
    finally:
        rotary.forward = original


def unwrap(model: torch.nn.Module) -> GPTModel:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model  # type: ignore[return-value]


@contextlib.contextmanager
def capture_final_hidden(model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the decoder's output ``[s, b, h]`` (after the final norm on the last stage).

    Usage: ``with capture_final_hidden(m) as cap: m(...); h = cap["hidden"]``. The tensor
    keeps its autograd graph, so losses on it (the CARFT embedding) reach the policy.
    """
    store: dict[str, torch.Tensor] = {}
    handle = unwrap(model).decoder.register_forward_hook(lambda _m, _i, out: store.__setitem__("hidden", out))
    try:
        yield store
    finally:
        handle.remove()
