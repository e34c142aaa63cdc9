"""Advantage estimators, selected by name: ``gae`` (PPO / ReFT / CARFT) and ``drgrpo`` (Dr.GRPO).

Each estimator maps one rollout's rewards (and, for GAE, the values) to per-token
advantages ``[B, T]`` in action space (column ``j`` scores token ``j + 1``; see
:mod:`carft_nemo.algorithms.ppo`):

* ``gae``: equation (2) of :mod:`~carft_nemo.algorithms.ppo` over the KL-penalised token
  rewards, then (optionally) whitened over the whole rollout, as ReFT does; also returns
  the value targets ``R_t = A_t + V_t``.
* ``drgrpo``: equation (1) of :mod:`~carft_nemo.algorithms.grpo`, ``A_i = R_i - mean`` of
  its question's group of samples, broadcast over the response tokens; no value targets.

Pure tensor code: no process group, no model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from carft_nemo.algorithms.grpo import group_advantages, token_advantages
from carft_nemo.algorithms.ppo import gae_advantages, masked_whiten


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may read; ``B`` samples, ``T`` action columns."""

    scores: Tensor  # [B] sequence scores (the reward after shaping)
    token_rewards: Tensor  # [B, T] per-token rewards: -kl_coef * KL, plus the score at the last token
    mask: Tensor  # [B, T] bool, True on response tokens
    values: Tensor | None = None  # [B, T] V of the state in which each action is taken (GAE only)


@dataclass(frozen=True)
class AdvantageSettings:
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True  # GAE: whiten the advantages over the rollout (ReFT)
    group_size: int = 1  # Dr.GRPO: samples per question (rows of one question are contiguous)


@dataclass(frozen=True)
class Advantages:
    advantages: Tensor  # [B, T], 0 off the mask
    returns: Tensor | None  # [B, T] value targets (GAE), None without a critic


def gae_estimator(inputs: AdvantageInputs, settings: AdvantageSettings) -> Advantages:
    """GAE(gamma, lambda) over the token rewards, whitened over the rollout when asked."""
    if inputs.values is None:
        raise ValueError("the gae estimator needs values (a critic or a shared value head)")
    advantages, returns = gae_advantages(inputs.token_rewards, inputs.values, inputs.mask, settings.gamma, settings.lam)
    if settings.whiten:
        advantages = masked_whiten(advantages, inputs.mask)
    return Advantages(advantages, returns)


def drgrpo_estimator(inputs: AdvantageInputs, settings: AdvantageSettings) -> Advantages:
    """Group-mean baseline of Dr.GRPO (no std division), on every response token."""
    return Advantages(token_advantages(group_advantages(inputs.scores, settings.group_size), inputs.mask), None)


Estimator = Callable[[AdvantageInputs, AdvantageSettings], Advantages]
ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {"gae": gae_estimator, "drgrpo": drgrpo_estimator}


def estimate_advantages(name: str, inputs: AdvantageInputs, settings: AdvantageSettings) -> Advantages:
    """Run the estimator registered as ``name``; ``KeyError`` naming the known ones otherwise."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise KeyError(f"unknown advantage estimator {name!r}; known: {sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name](inputs, settings)


__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AdvantageInputs",
    "AdvantageSettings",
    "Advantages",
    "drgrpo_estimator",
    "estimate_advantages",
    "gae_estimator",
]
