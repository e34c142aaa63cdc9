"""The actor's per-micro-batch computations: rollout-time outputs and the training loss.

    L = L_policy + c_vf * L_value (shared critic only) + c_cl * L_contrastive (CARFT)

``L_policy`` and ``L_value`` are token sums of :mod:`carft_nemo.algorithms.ppo`, divided by
the mini-batch's global response-token count (PPO / ReFT: a token mean) or by Dr.GRPO's
constant. ``L_contrastive`` (:func:`carft_nemo.algorithms.contrastive.contrastive_loss`) is a
per-micro-batch mean that already averages over data-parallel ranks; it is multiplied by
``mean_term_weight`` = normaliser / (dp * micro-batches) because
:func:`~carft_nemo.training.forward_backward.run_forward_backward` scales every returned
sum by dp * micro-batches / normaliser (and megatron and DDP then average).

A micro-batch holds rows of :meth:`carft_nemo.rl.experience.Experience.actor_batch`: the keys
and ``[b, ...]`` shapes are documented once, on :class:`~carft_nemo.rl.experience.Experience`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from carft_nemo.algorithms.contrastive import ContrastiveConfig, CoTBatch, LcsSpans, contrastive_loss
from carft_nemo.algorithms.ppo import clipped_policy_loss, clipped_value_loss
from carft_nemo.models.heads import CONTRASTIVE_HEAD, shared_values
from carft_nemo.models.logprobs import token_entropy, token_logprobs
from carft_nemo.workers.contracts import POLICY_OUTPUTS


@dataclass
class ActorTrainSettings:
    """How the actor trains on one rollout (the critic's counterpart: ``CriticTrainSettings``)."""

    epochs: int
    mini_batch_rows: int  # rows per optimizer step on this replica
    seed: int  # the row order of each epoch derives from it
    clip_ratio: float = 0.2
    temperature: float = 1.0
    constant_normalizer: float = 0.0  # > 0: Dr.GRPO's constant instead of the token count
    shared_value: bool = False
    value_clip: float = 0.2
    value_loss_coef: float = 1.0
    contrastive: ContrastiveConfig | None = None
    probe_gradients: bool = False  # this step, measure the contrastive / policy gradient ratio first
    lr_scale: float = 1.0  # multiplies the scheduled LR (the collapse guard lowers it after a rollback)


def policy_outputs(
    gpt: torch.nn.Module, outputs: tuple[str, ...], temperature: float, vocab_size: int
) -> Callable[..., dict[str, torch.Tensor]]:
    """``(logits, micro, hidden) -> {name: [b, ...]}`` for :meth:`ModelWorker.collect_forward`."""
    unknown = set(outputs) - set(POLICY_OUTPUTS)
    if unknown:
        raise ValueError(f"unknown actor outputs {sorted(unknown)}")

    def fn(logits: torch.Tensor, micro: dict[str, torch.Tensor], hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        if "logprobs" in outputs:
            out["logprobs"] = token_logprobs(logits[:, :-1], micro["tokens"][:, 1:], temperature, vocab_size=vocab_size)
        if "values" in outputs:
            out["values"] = shared_values(gpt, hidden).t()
        if "embeddings" in outputs:
            out["embeddings"] = getattr(gpt, CONTRASTIVE_HEAD)(hidden).transpose(0, 1)
        return out

    return fn


def policy_term(
    logits: torch.Tensor, micro: dict[str, torch.Tensor], settings: ActorTrainSettings, vocab_size: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L_policy`` (a token sum) and its metrics, entropy included; ``logits [b, S, V/tp]``."""
    mask = micro["action_mask"].bool()
    logits = logits[:, :-1]
    logp = token_logprobs(logits, micro["tokens"][:, 1:], settings.temperature, vocab_size=vocab_size)
    total, metrics = clipped_policy_loss(logp, micro["old_logprobs"], micro["advantages"], mask, settings.clip_ratio)
    metrics = dict(metrics)
    entropy = token_entropy(logits, settings.temperature, vocab_size=vocab_size)
    metrics["policy/entropy"] = (entropy * mask).sum()
    return total, metrics


def contrastive_term(
    gpt: torch.nn.Module,
    micro: dict[str, torch.Tensor],
    hidden: torch.Tensor,
    values: torch.Tensor | None,
    cfg: ContrastiveConfig,
    dp_group,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``c_cl * L_contrastive`` of the micro-batch (this rank's share) and its global-batch metrics.

    ``values [s, b]``: the shared value head's (with gradient, as the authors' head); ``None``
    takes the separate critic's rollout-time values from the batch.
    """
    token_values = values if values is not None else micro["critic_token_values"].t()
    on_policy = CoTBatch(getattr(gpt, CONTRASTIVE_HEAD)(hidden), token_values, micro["response_mask"].t().bool())
    annotated = CoTBatch(
        micro["ann_embeddings"].transpose(0, 1), micro["ann_values"].t(), micro["ann_cot_mask"].t().bool()
    )
    lcs = None
    if cfg.uses_negative:
        lcs = LcsSpans(micro["ann_common"].t().bool(), micro["gen_common"].t().bool(), micro["lcs_length"])
    return contrastive_loss(cfg, on_policy, annotated, micro["correct"].bool(), lcs, dp_group=dp_group)


def actor_loss(
    gpt: torch.nn.Module, settings: ActorTrainSettings, vocab_size: int, dp_group, *, mean_term_weight: float
) -> Callable:
    """The training loss function of one mini-batch (see the module docstring)."""
    dp_size = torch.distributed.get_world_size(dp_group) if dp_group is not None else 1
    cl_cfg = settings.contrastive if settings.contrastive is not None and settings.contrastive.enabled else None

    def loss_fn(logits: torch.Tensor, micro: dict[str, torch.Tensor], hidden: torch.Tensor):
        total, metrics = policy_term(logits, micro, settings, vocab_size)
        metrics["count/micro_batches"] = torch.tensor(1.0 / dp_size, device=total.device)
        values = None
        if settings.shared_value:
            values = shared_values(gpt, hidden)  # [s, b], value after reading token t
            v_sum, v_metrics = clipped_value_loss(
                values.t()[:, :-1],
                micro["old_values"],
                micro["returns"],
                micro["action_mask"].bool(),
                settings.value_clip,
            )
            total = total + settings.value_loss_coef * v_sum
            metrics.update(v_metrics)
        if cl_cfg is not None:
            cl_loss, cl_metrics = contrastive_term(gpt, micro, hidden, values, cl_cfg, dp_group)
            total = total + cl_loss * mean_term_weight
            # metrics are global-batch values on every rank; / dp so that the DP sum restores them
            metrics.update({k: v / dp_size for k, v in cl_metrics.items()})
        return total, metrics

    return loss_fn


__all__ = ["ActorTrainSettings", "actor_loss", "contrastive_term", "policy_outputs", "policy_term"]
