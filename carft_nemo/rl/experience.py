"""One round of rollouts turned into training tensors: the :class:`Experience` (controller side, pure).

Shapes: ``B`` samples, ``S`` prompt+response positions, ``T = S - 1`` action columns
(column j is token j + 1 chosen after tokens[:j+1]; see :mod:`carft_nemo.algorithms.ppo`),
``Sa`` annotated prompt+CoT positions, ``d`` the CARFT projection size. Values from a
critic are "value after reading token t" ``[B, S]``; the value of the state in which action
column j is taken is therefore ``values[:, j]`` (= ``values[:, :-1]``).

:func:`build_experience` is the whole assembly, in this order:

1. value selection: the shared value head's or the critic's values (:func:`select_values`);
2. reward shaping: CARFT's partial reward, the unfinished score
   (:mod:`carft_nemo.algorithms.reward_shaping`);
3. KL penalty: ``-kl_coef * (log pi - log pi_ref)`` per token, the score at the last token
   (:func:`penalized_token_rewards`);
4. advantages by the configured estimator (:mod:`carft_nemo.algorithms.advantages`);
5. the step's metrics (:func:`experience_metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from carft_nemo.algorithms.advantages import AdvantageInputs, Advantages, AdvantageSettings, estimate_advantages
from carft_nemo.algorithms.contrastive import ContrastiveConfig, lcs_spans, pool_cot_embedding
from carft_nemo.algorithms.ppo import kl_penalized_rewards, masked_mean
from carft_nemo.algorithms.reward_shaping import PartialRewardTerm, ShapedRewards, shape_rewards
from carft_nemo.data.tokenization import EncodedExample, collate
from carft_nemo.generation.rollout import Rollout, RolloutBatch
from carft_nemo.workers.reward import ScoredSample


def join_rollouts(parts: Sequence[Rollout]) -> Rollout:
    """Concatenate the rollouts of the data-parallel replicas, in replica order."""
    return Rollout(
        prompts=[p for r in parts for p in r.prompts],
        responses=[x for r in parts for x in r.responses],
        logprobs=[x for r in parts for x in r.logprobs],
        finished=[x for r in parts for x in r.finished],
    )


def action_mask(batch: RolloutBatch) -> Tensor:
    """``[B, T]`` True where action column j is a response token."""
    return batch.response_mask[:, 1:]


@dataclass(frozen=True)
class AnnotatedBatch:
    """Prompt + annotated CoT (+ EOS) of each sample's question.

    ``tokens`` and ``cot_mask`` ``[B, Sa]``, ``lengths [B]``.
    """

    tokens: Tensor
    cot_mask: Tensor
    lengths: Tensor

    @classmethod
    def build(cls, encoded: Sequence[EncodedExample], pad_id: int) -> AnnotatedBatch:
        batch = collate([e.tokens for e in encoded], pad_id, loss_masks=[e.loss_mask for e in encoded])
        return cls(batch["tokens"], batch["loss_mask"].bool(), batch["lengths"])


# ---------------------------------------------------------------------------- forward rows


def forward_rows(batch: RolloutBatch) -> dict[str, Tensor]:
    """What the forward calls read of a rollout: ``tokens [B, S]`` and ``lengths [B]``."""
    return {"tokens": batch.tokens, "lengths": batch.prompt_lengths + batch.response_lengths}


def with_annotated_rows(rows: dict[str, Tensor], annotated: AnnotatedBatch, pad_id: int) -> dict[str, Tensor]:
    """The rollout rows followed by the annotated rows, right-padded to the wider of the two.

    CARFT's annotated sequences ride in the same actor / critic calls as the on-policy ones
    (causal attention makes the padding invisible): their FLOPs, no extra round trip.
    """
    width = max(rows["tokens"].shape[1], annotated.tokens.shape[1])

    def grow(t: Tensor) -> Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad_id)

    tokens = torch.cat([grow(rows["tokens"]), grow(annotated.tokens)], dim=0)
    return {"tokens": tokens, "lengths": torch.cat([rows["lengths"], annotated.lengths])}


def split_annotated_outputs(
    outputs: dict[str, Tensor], rows: int, width: int, annotated_width: int
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Undo :func:`with_annotated_rows` on per-token outputs: (rollout part, annotated part).

    Each part is cut back to its own width (``S`` or ``Sa`` positions; log-probs have one fewer).
    """

    def columns(t: Tensor, key: str, w: int) -> Tensor:
        return t[:, : w - 1] if key == "logprobs" else t[:, :w]

    rollout = {k: columns(v[:rows], k, width) for k, v in outputs.items()}
    annotated = {k: columns(v[rows:], k, annotated_width) for k, v in outputs.items()}
    return rollout, annotated


# ---------------------------------------------------------------------------- the experience


@dataclass
class InferenceResults:
    """What the overlapped inference phase returned for one rollout (``None``: not asked)."""

    policy: dict[str, Tensor]  # logprobs [B, T]; values [B, S] (shared head); embeddings [B, S, d] (CARFT)
    scored: list[ScoredSample]  # the reward pool's verdict per sample
    critic: dict[str, Tensor] | None = None  # values [B, S] (separate critic)
    reference_logprobs: Tensor | None = None  # [B, T] under the frozen SFT policy (kl_coef > 0)
    policy_annotated: dict[str, Tensor] | None = None  # CARFT: embeddings [B, Sa, d]; values [B, Sa] (shared)
    critic_annotated: dict[str, Tensor] | None = None  # CARFT: values [B, Sa] (separate critic)


@dataclass
class CarftTensors:
    """The contrastive term's inputs for every sample (CARFT only)."""

    response_mask: Tensor  # [B, S] bool: the on-policy CoT tokens
    correct: Tensor  # [B] bool
    critic_token_values: Tensor  # [B, S] rollout-time values (the shared head recomputes its own)
    ann_embeddings: Tensor  # [B, Sa, d] annotated-CoT token embeddings (rollout time, fixed target)
    ann_values: Tensor  # [B, Sa]
    ann_cot_mask: Tensor  # [B, Sa] bool
    ann_common: Tensor | None = None  # [B, Sa] bool: annotated tokens in the LCS (negative signal)
    gen_common: Tensor | None = None  # [B, S] bool: on-policy tokens in the LCS
    lcs_length: Tensor | None = None  # [B]


@dataclass
class Experience:
    """The training tensors of one rollout; the keys of the actor's and critic's batches."""

    tokens: Tensor  # [B, S] long, prompt + response, right-padded
    action_mask: Tensor  # [B, T] bool, True on response tokens
    old_logprobs: Tensor  # [B, T] log pi_old at rollout time, 0 off the mask
    advantages: Tensor  # [B, T], 0 off the mask
    old_values: Tensor | None = None  # [B, T] V at rollout time (PPO)
    returns: Tensor | None = None  # [B, T] value targets (PPO)
    carft: CarftTensors | None = None

    def actor_batch(self, *, with_value_targets: bool) -> dict[str, Tensor]:
        """The actor's batch: every field except the value targets, unless the shared head trains on them."""
        batch = {"tokens": self.tokens, "action_mask": self.action_mask, "old_logprobs": self.old_logprobs}
        if self.carft is not None:
            batch.update({k: v for k, v in vars(self.carft).items() if v is not None})
        if with_value_targets:
            batch.update(old_values=self.old_values, returns=self.returns)
        batch["advantages"] = self.advantages
        return batch

    def critic_batch(self) -> dict[str, Tensor]:
        """The separate critic's batch: tokens, mask and its regression targets."""
        if self.old_values is None or self.returns is None:
            raise ValueError("no value targets: this experience was built without values (Dr.GRPO)")
        return {
            "tokens": self.tokens,
            "action_mask": self.action_mask,
            "old_values": self.old_values,
            "returns": self.returns,
        }


@dataclass(frozen=True)
class ExperienceSettings:
    estimator: str  # a key of carft_nemo.algorithms.advantages.ADVANTAGE_ESTIMATORS
    advantage: AdvantageSettings
    kl_coef: float
    unfinished_score: float | None = None
    shared_value_head: bool = False
    contrastive: ContrastiveConfig | None = None  # CARFT when set


def select_values(results: InferenceResults, *, shared_value_head: bool) -> tuple[Tensor, Tensor | None]:
    """``(values [B, S], annotated values [B, Sa] or None)``: the policy's value head's or the critic's."""
    source, annotated = (
        (results.policy, results.policy_annotated) if shared_value_head else (results.critic, results.critic_annotated)
    )
    where = "the policy's shared value head" if shared_value_head else "the critic"
    if source is None or "values" not in source:
        raise ValueError(f"no values from {where} in the inference results")
    return source["values"], (annotated["values"] if annotated is not None else None)


def penalized_token_rewards(
    scores: Tensor, logprobs: Tensor, reference_logprobs: Tensor | None, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """``(token rewards [B, T], kl [B, T])``, equation (1) of :mod:`~carft_nemo.algorithms.ppo`.

    Without reference log-probs (``kl_coef`` 0: no reference pass runs) the KL is 0.
    """
    reference = reference_logprobs * mask if reference_logprobs is not None else logprobs.clone()
    return kl_penalized_rewards(scores, logprobs, reference, mask, kl_coef)


def lcs_split(annotated: AnnotatedBatch, rollout: RolloutBatch, *, cot_only: bool = False) -> dict[str, Tensor]:
    """LCS membership of annotated vs on-policy tokens (CARFT's negative signal).

    ``ann_common [B, Sa]`` and ``gen_common [B, S]`` (bool, the tokens of the longest common
    subsequence) and ``lcs_length [B]``: the :class:`CarftTensors` fields. Over the whole
    prompt + CoT sequences, as the authors' v9 does (the shared prompt is then in the LCS),
    or over the CoT tokens only (``cot_only``: ``contrastive.lcs_cot_only``).
    """
    if cot_only:
        ann_mask, gen_mask = annotated.cot_mask, rollout.response_mask
    else:
        ann_mask = torch.arange(annotated.tokens.shape[1])[None, :] < annotated.lengths[:, None]
        gen_mask = rollout.attention_mask
    spans = lcs_spans(annotated.tokens.t(), ann_mask.t(), rollout.tokens.t(), gen_mask.t())
    return {
        "ann_common": spans.annotated_common.t(),
        "gen_common": spans.on_policy_common.t(),
        "lcs_length": spans.length,
    }


def pooled_embeddings(embeddings: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """z ``[B, d]`` from ``[B, S, d]`` token embeddings, ``[B, S]`` values and mask (no gradient)."""
    with torch.no_grad():
        return pool_cot_embedding(embeddings.transpose(0, 1), values.t(), mask.t()).z


def carft_tensors(
    rollout: RolloutBatch,
    annotated: AnnotatedBatch,
    results: InferenceResults,
    correct: Tensor,
    settings: ExperienceSettings,
) -> CarftTensors:
    """The contrastive inputs; with the negative signal, the LCS split of annotated vs on-policy tokens."""
    values, ann_values = select_values(results, shared_value_head=settings.shared_value_head)
    tensors = CarftTensors(
        response_mask=rollout.response_mask,
        correct=correct,
        critic_token_values=values,
        ann_embeddings=results.policy_annotated["embeddings"],
        ann_values=ann_values,
        ann_cot_mask=annotated.cot_mask,
    )
    if settings.contrastive.uses_negative:
        split = lcs_split(annotated, rollout, cot_only=settings.contrastive.lcs_cot_only)
        tensors.ann_common, tensors.gen_common = split["ann_common"], split["gen_common"]
        tensors.lcs_length = split["lcs_length"]
    return tensors


@dataclass(frozen=True)
class PooledPair:
    """Rollout-time CoT embeddings of every sample: ``z_annotated``, ``z_on_policy`` ``[B, d]``."""

    z_annotated: Tensor
    z_on_policy: Tensor

    @classmethod
    def of(cls, carft: CarftTensors, results: InferenceResults) -> PooledPair:
        return cls(
            pooled_embeddings(carft.ann_embeddings, carft.ann_values, carft.ann_cot_mask),
            pooled_embeddings(results.policy["embeddings"], carft.critic_token_values, carft.response_mask),
        )

    def cosine(self) -> Tensor:
        """``cos(z_ann_i, z_gen_i)`` ``[B]``; 0 where a CoT is empty."""
        return torch.nn.functional.cosine_similarity(
            self.z_annotated.float(), self.z_on_policy.float(), dim=-1, eps=1e-8
        )


def shaped_rewards(
    rollout: RolloutBatch,
    results: InferenceResults,
    carft: CarftTensors | None,
    pair: PooledPair | None,
    settings: ExperienceSettings,
) -> ShapedRewards:
    """The pool's rewards with the partial reward (v11) and the unfinished score applied."""
    rewards = torch.tensor([s.reward for s in results.scored], dtype=torch.float32)
    partial = None
    cl = settings.contrastive
    if carft is not None and pair is not None and cl.partial_reward:
        extracted = torch.tensor([s.extracted for s in results.scored])
        partial = PartialRewardTerm(cl, pair.z_annotated, pair.z_on_policy, extracted & ~carft.correct)
    return shape_rewards(rewards, rollout.finished, unfinished_score=settings.unfinished_score, partial=partial)


def contrastive_diagnostics(
    pair: PooledPair, correct: Tensor, extracted: Tensor, cfg: ContrastiveConfig
) -> dict[str, float]:
    """What the contrastive signals see in this rollout (rollout-time embeddings, no gradient).

    ``contrastive/cos_*``: cos(z_ann, z_gen) over the samples (mean, 10/50/90th percentiles)
    and over the correct ones; ``contrastive/correct_under_clamp``: the fraction of correct
    samples whose cosine is below the clamp, the only ones v4's gradient reaches;
    ``contrastive/partial_reward_std`` / ``_min`` / ``_max``: the spread of v11's
    ``scale * cos + offset`` over the wrong-but-extractable samples (computed for every
    variant: whether the partial reward would carry information).
    """
    cos = pair.cosine()
    q = torch.quantile(cos, torch.tensor([0.1, 0.5, 0.9]))
    out = {
        "contrastive/cos_mean": float(cos.mean()),
        "contrastive/cos_p10": float(q[0]),
        "contrastive/cos_p50": float(q[1]),
        "contrastive/cos_p90": float(q[2]),
    }
    if correct.any():
        out["contrastive/cos_correct_mean"] = float(cos[correct].mean())
        clamp = cfg.clamp_positive_similarity if cfg.clamp_positive_similarity is not None else float("inf")
        out["contrastive/correct_under_clamp"] = float((cos[correct] < clamp).float().mean())
    wrong = extracted & ~correct
    if wrong.any():
        partial = cfg.partial_reward_scale * cos[wrong] + cfg.partial_reward_offset
        out.update(
            {
                "contrastive/partial_reward_std": float(partial.std(unbiased=False)),
                "contrastive/partial_reward_min": float(partial.min()),
                "contrastive/partial_reward_max": float(partial.max()),
            }
        )
    return out


def experience_metrics(
    rollout: RolloutBatch,
    results: InferenceResults,
    shaped: ShapedRewards,
    kl: Tensor,
    advantages: Advantages,
    mask: Tensor,
    old_values: Tensor | None,
) -> dict[str, float]:
    """The step's rollout metrics (means over the rollout)."""
    metrics: dict[str, float] = {}
    if shaped.partial_reward_mean is not None:
        metrics["partial_reward"] = shaped.partial_reward_mean
    if old_values is not None and advantages.returns is not None:
        metrics["value_mean"] = float(masked_mean(old_values, mask))
        metrics["return_mean"] = float(masked_mean(advantages.returns, mask))
    metrics.update(
        reward=float(shaped.rewards.mean()),
        score=float(shaped.scores.mean()),
        accuracy=float(torch.tensor([s.correct for s in results.scored]).float().mean()),
        extracted=float(torch.tensor([s.extracted for s in results.scored]).float().mean()),
        kl=float((kl.sum(dim=1)).mean()),
        response_length=float(rollout.response_lengths.float().mean()),
        finished=float(rollout.finished.float().mean()),
        advantage_abs_mean=float(masked_mean(advantages.advantages.abs(), mask)),
    )
    return metrics


def build_experience(
    rollout: RolloutBatch, annotated: AnnotatedBatch | None, results: InferenceResults, settings: ExperienceSettings
) -> tuple[Experience, dict[str, float]]:
    """The :class:`Experience` of one rollout and its metrics (the steps of the module docstring)."""
    mask = action_mask(rollout)
    logprobs = results.policy["logprobs"] * mask
    correct = torch.tensor([s.correct for s in results.scored])
    carft = pair = None
    if settings.contrastive is not None:
        carft = carft_tensors(rollout, annotated, results, correct, settings)
        pair = PooledPair.of(carft, results)
    shaped = shaped_rewards(rollout, results, carft, pair, settings)
    token_rewards, kl = penalized_token_rewards(
        shaped.scores, logprobs, results.reference_logprobs, mask, settings.kl_coef
    )
    old_values = None
    if settings.estimator == "gae":
        old_values = select_values(results, shared_value_head=settings.shared_value_head)[0][:, :-1] * mask
    inputs = AdvantageInputs(shaped.scores, token_rewards, mask, old_values)
    advantages = estimate_advantages(settings.estimator, inputs, settings.advantage)
    experience = Experience(
        rollout.tokens, mask, logprobs, advantages.advantages, old_values, advantages.returns, carft
    )
    metrics = experience_metrics(rollout, results, shaped, kl, advantages, mask, old_values)
    if pair is not None:
        extracted = torch.tensor([s.extracted for s in results.scored])
        metrics.update(contrastive_diagnostics(pair, correct, extracted, settings.contrastive))
    return experience, metrics


__all__ = [
    "AnnotatedBatch",
    "CarftTensors",
    "Experience",
    "ExperienceSettings",
    "InferenceResults",
    "PooledPair",
    "action_mask",
    "build_experience",
    "carft_tensors",
    "contrastive_diagnostics",
    "experience_metrics",
    "forward_rows",
    "join_rollouts",
    "lcs_split",
    "penalized_token_rewards",
    "pooled_embeddings",
    "select_values",
    "shaped_rewards",
    "split_annotated_outputs",
    "with_annotated_rows",
]
