"""The actor's per-micro-batch computations: rollout-time outputs and the training loss.

    L = L_policy + c_vf * L_value (shared critic only) + c_cl * L_contrastive (CARFT)

``L_policy`` and ``L_value`` are token sums of :mod:`carft_nemo.algorithms.ppo`, divided by
the mini-batch's global response-token count (PPO / ReFT: a token mean) or by Dr.GRPO's
constant. ``L_contrastive`` (:func:`carft_nemo.algorithms.contrastive.contrastive_loss`) is a
per-micro-batch mean that already averages over data-parallel ranks; it is multiplied by
``mean_term_weight`` = normaliser / (dp * micro-batches) because
:func:`~carft_nemo.training.forward_backward.run_forward_backward` scales every returned
sum by dp * micro-batches / normaliser (and megatron and DDP then average).

A micro-batch holds rows of :meth:`carft_nemo.rl.experience.Experience.actor_batch` (keys and
``[b, ...]`` shapes documented once, on :class:`~carft_nemo.rl.experience.Experience`) with the
action columns on the positions that choose them and the next-token ``targets``
(:func:`carft_nemo.workers.model_worker.on_token_positions`): nothing here shifts tokens, so
under context parallelism each rank scores its own positions. The token sums add up over the
context-parallel ranks (megatron and DDP do that); the pooled CoT embeddings combine the ranks'
partial sums (``seq_group``), so the contrastive loss is the same on each of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from carft_nemo.algorithms.contrastive import ContrastiveConfig, CoTBatch, LcsSpans, contrastive_loss
from carft_nemo.algorithms.ppo import clipped_policy_loss, clipped_value_loss
from carft_nemo.distributed.collectives import group_size
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
        if "logprobs" in outputs:  # [b, S]: position t's log p of targets[t] = tokens[t + 1]
            out["logprobs"] = token_logprobs(logits, micro["targets"], temperature, vocab_size=vocab_size)
        if "values" in outputs:
            out["values"] = shared_values(gpt, hidden).t()
        if "embeddings" in outputs:
            out["embeddings"] = getattr(gpt, CONTRASTIVE_HEAD)(hidden).transpose(0, 1)
        return out

    return fn


def policy_term(
    logits: torch.Tensor, micro: dict[str, torch.Tensor], settings: ActorTrainSettings, vocab_size: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L_policy`` (a token sum) and its metrics, entropy included; ``logits [b, S, V/tp]``, the
    batch on token positions (module docstring)."""
    mask = micro["action_mask"].bool()
    logp = token_logprobs(logits, micro["targets"], settings.temperature, vocab_size=vocab_size)
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
    cp_group=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``c_cl * L_contrastive`` of the micro-batch (this rank's share) and its global-batch metrics.

    ``values [s, b]``: the shared value head's (with gradient, as the authors' head); ``None``
    takes the separate critic's rollout-time values from the batch. ``cp_group``: the
    context-parallel group sharding ``s`` (every per-token tensor here, the annotated ones too).
    """
    token_values = values if values is not None else micro["critic_token_values"].t()
    on_policy = CoTBatch(getattr(gpt, CONTRASTIVE_HEAD)(hidden), token_values, micro["response_mask"].t().bool())
    annotated = CoTBatch(
        micro["ann_embeddings"].transpose(0, 1), micro["ann_values"].t(), micro["ann_cot_mask"].t().bool()
    )
    lcs = None
    if cfg.uses_negative:
        lcs = LcsSpans(micro["ann_common"].t().bool(), micro["gen_common"].t().bool(), micro["lcs_length"])
    return contrastive_loss(
        cfg, on_policy, annotated, micro["correct"].bool(), lcs, dp_group=dp_group, seq_group=cp_group
    )


def _counted_once(term: torch.Tensor, ranks: int) -> torch.Tensor:
    """``term`` with its gradient, valued ``term / ranks``: every context-parallel rank holds the
    whole contrastive term (its gradient reaches this rank's tokens through their partial sums of
    the pooled embedding), and the loss summed over the ranks must count it once."""
    return term if ranks == 1 else term + (term / ranks - term).detach()


def actor_loss(
    gpt: torch.nn.Module,
    settings: ActorTrainSettings,
    vocab_size: int,
    dp_group,
    *,
    mean_term_weight: float,
    cp_group=None,
) -> Callable:
    """The training loss function of one mini-batch (see the module docstring)."""
    # metrics are summed over data x context parallel ranks: a value every one of them holds is
    # divided by that many
    replicas = group_size(dp_group) * group_size(cp_group)
    cl_cfg = settings.contrastive if settings.contrastive is not None and settings.contrastive.enabled else None

    def loss_fn(logits: torch.Tensor, micro: dict[str, torch.Tensor], hidden: torch.Tensor):
        total, metrics = policy_term(logits, micro, settings, vocab_size)
        metrics["count/micro_batches"] = torch.tensor(1.0 / replicas, device=total.device)
        values = None
        if settings.shared_value:
            values = shared_values(gpt, hidden)  # [s, b], value after reading token t
            v_sum, v_metrics = clipped_value_loss(
                values.t(),
                micro["old_values"],
                micro["returns"],
                micro["action_mask"].bool(),
                settings.value_clip,
            )
            total = total + settings.value_loss_coef * v_sum
            metrics.update(v_metrics)
        if cl_cfg is not None:
            cl_loss, cl_metrics = contrastive_term(gpt, micro, hidden, values, cl_cfg, dp_group, cp_group)
            total = total + _counted_once(cl_loss * mean_term_weight, group_size(cp_group))
            # global-batch values on every rank: the sum over data x context parallel restores them
            metrics.update({k: v / replicas for k, v in cl_metrics.items()})
        return total, metrics

    return loss_fn


__all__ = ["ActorTrainSettings", "actor_loss", "contrastive_term", "policy_outputs", "policy_term"]
