"""Heads that sit on the final (normed) hidden states of the last pipeline stage."""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class ValueHead(torch.nn.Module):
    """Scalar value V_t = w^T h_t + b, in place of the LM output layer (critic).

    Hidden states after the final norm are replicated across tensor-parallel ranks, so the
    head is a plain replicated linear layer. It keeps the ``output_layer`` call convention
    of megatron's GPTModel (``(hidden, weight=None, ...) -> (out, bias)``) so pipeline
    schedules and GPTModel.forward run unchanged; GPTModel then returns ``[b, s, 1]``.
    Initialised to zero so a fresh critic starts from V = 0 (the score's scale is unknown).
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        # ``weight``/``bias`` directly on the module (not a nested Linear): megatron's
        # LanguageModule.sharded_state_dict looks up ``output_layer.weight`` by name.
        self.weight = torch.nn.Parameter(torch.zeros(1, config.hidden_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=config.params_dtype))
        self.sequence_parallel = False

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor | None = None, **_: object):
        return torch.nn.functional.linear(hidden.to(self.weight.dtype), self.weight, self.bias), None


SHARED_VALUE_HEAD = "value_head"
CONTRASTIVE_HEAD = "contrastive_head"
POLICY_HEADS = (SHARED_VALUE_HEAD, CONTRASTIVE_HEAD)


def attach_policy_heads(gpt: torch.nn.Module, *, shared_value_head: bool, contrastive_dim: int) -> None:
    """Add the RL heads that read the policy's final hidden states (last pipeline stage only).

    ``value_head``: the critic sharing the policy backbone (ReFT / CARFT paper layout).
    ``contrastive_head``: CARFT's projection e_t = W h_t (``contrastive_dim`` > 0).
    They become submodules of the GPTModel before it is wrapped for training, so megatron's
    DDP, optimizer and distributed checkpoints treat them like any other parameter.
    """
    from carft_nemo.models.contrastive_head import ContrastiveHead

    if not getattr(gpt, "post_process", True):
        return
    config = gpt.config
    if shared_value_head:
        setattr(gpt, SHARED_VALUE_HEAD, ValueHead(config))
    if contrastive_dim > 0:
        head = ContrastiveHead(config.hidden_size, contrastive_dim, sequence_parallel=config.sequence_parallel)
        setattr(gpt, CONTRASTIVE_HEAD, head.to(next(gpt.parameters()).device))


def shared_values(gpt: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Values ``[s, b]`` of the shared value head on final hidden states ``[s, b, h]``."""
    out, _ = getattr(gpt, SHARED_VALUE_HEAD)(hidden)
    return out.squeeze(-1).float()
