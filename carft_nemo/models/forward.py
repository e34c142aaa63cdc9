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
