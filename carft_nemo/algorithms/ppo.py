"""PPO pieces as used by ReFT (Luong et al. 2024): KL-shaped rewards, GAE, clipped losses.

Every per-token tensor is ``[B, T]`` in *action space*: column ``j`` scores the action
``tokens[:, j+1]`` taken after the prefix ``tokens[:, :j+1]``. ``mask [B, T]`` (bool) is
True on response tokens, contiguous and right padded per row; a row may be empty.

Equations (m = mask, rho_t = exp(log pi_theta - log pi_old)):

    (1) r_t   = -beta * (log pi_theta(a_t) - log pi_ref(a_t)) * m_t  +  1[t = last_b] * score_b
    (2) delta_t = r_t + gamma * V_{t+1} m_{t+1} - V_t
        A_t   = delta_t + gamma * lam * m_{t+1} * A_{t+1},      R_t = A_t + V_t
    (3) L_pi  = sum_t m_t * max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))
    (4) L_V   = sum_t m_t * 0.5 * max((V_t - R_t)^2, (clip(V_t, V_old - c, V_old + c) - R_t)^2)

Losses are *sums* over masked tokens: callers divide by a token count that is global over
the data-parallel batch, so the result does not depend on how the batch is sharded.
Everything outside the mask is exactly 0; it is selected with ``torch.where`` (never
multiplied by the mask) so padding holding ``inf``/``nan`` can't leak through as ``nan``.
No torch.distributed here: these functions are pure and CPU-testable.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "clipped_policy_loss",
    "clipped_value_loss",
    "gae_advantages",
    "kl_penalized_rewards",
    "last_token_onehot",
    "masked_mean",
    "masked_whiten",
]


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` on the mask, exact 0 elsewhere (also when ``x`` holds inf/nan there)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def last_token_onehot(mask: Tensor) -> Tensor:
    """Bool ``[B, T]``: True only at each row's last True of ``mask``; empty rows all False."""
    counts = mask.long()
    # The running count reaches the row total exactly at the last response token.
    return mask & (counts.cumsum(-1) == counts.sum(-1, keepdim=True))


def kl_penalized_rewards(
    scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """Per-token rewards of ReFT's PPO, equation (1) of the module docstring.

    ``r_t = -kl_coef * (logp_t - ref_logp_t)`` on response tokens, plus the sequence score
    ``scores[b]`` added at the last response token of row ``b`` (rows with an empty mask get
    nothing). Returns ``(rewards [B, T], kl [B, T])`` with ``kl = (logp - ref_logp) * mask``.
    """
    kl = _masked(logprobs - ref_logprobs, mask)
    terminal = _masked(scores.to(kl.dtype)[:, None].expand_as(kl), last_token_onehot(mask))
    rewards = _masked(-kl_coef * kl + terminal, mask)
    return rewards, kl


@torch.no_grad()
def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over each row's response, equation (2).

    ``delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t`` and
    ``A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1}``: the value after the last response
    token is 0 because the episode ends there. Returns ``(advantages, returns)`` with
    ``R_t = A_t + V_t``, both 0 outside the mask and detached (they are regression/targets,
    never differentiated). Vectorised over the batch, one backward pass over T.
    """
    r = _masked(rewards, mask)
    v = _masked(values.to(r.dtype), mask)
    m = mask.to(r.dtype)
    adv = torch.zeros_like(r)
    next_adv = torch.zeros_like(r[:, 0])
    next_value = torch.zeros_like(r[:, 0])  # m_{t+1} * V_{t+1}; 0 past the sequence end
    next_mask = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        # Multiply by m_t so prompt positions don't carry an advantage into the sum.
        adv[:, t] = (delta + gamma * lam * next_mask * next_adv) * m[:, t]
        next_adv, next_value, next_mask = adv[:, t], v[:, t], m[:, t]
    returns = _masked(adv + v, mask)
    return _masked(adv, mask), returns


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """``sum(m * x) / sum(m)`` over the whole tensor; 0 for an empty mask."""
    total = _masked(x, mask).sum()
    count = mask.sum().to(total.dtype)
    return total / count.clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mu) / sqrt(s^2 + eps)`` with mu, s^2 over all masked entries of the batch.

    ``s^2`` is the unbiased variance, ``n / (n - 1)`` times the biased one when ``n > 1``
    (ReFT's ``masked_var``). ``shift_mean=False`` adds ``mu`` back, i.e. only rescales, as
    TRL/ReFT do for advantages. 0 outside the mask; an empty mask gives all zeros.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum().to(var.dtype)
    var = torch.where(n > 1, var * n / (n - 1).clamp(min=1), var)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _masked(out, mask)


def clipped_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_ratio: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate, equation (3): ``sum_t m_t max(-A rho, -A clip(rho, 1-eps, 1+eps))``.

    Returns ``(loss, metrics)``: ``loss`` is the sum over masked tokens, differentiable with
    respect to ``logprobs``; ``metrics`` are detached sums over masked tokens:
    ``policy/clipped_tokens`` (the clipped branch is strictly the max, so the token gets no
    gradient), ``policy/approx_kl`` (sum of ``0.5 (logp - old)^2``), ``policy/ratio`` (sum of
    rho) and ``policy/tokens``.
    """
    # Zero the log-ratio off the mask *before* exp: padding can't overflow or poison grads.
    log_ratio = _masked(logprobs - old_logprobs, mask)
    adv = _masked(advantages.to(log_ratio.dtype), mask)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio)
    loss = _masked(torch.maximum(unclipped, clipped), mask).sum()
    with torch.no_grad():
        metrics = {
            "policy/clipped_tokens": ((clipped > unclipped) & mask).sum().to(loss.dtype),
            "policy/approx_kl": _masked(0.5 * log_ratio**2, mask).sum(),
            "policy/ratio": _masked(ratio, mask).sum(),
            "policy/tokens": mask.sum().to(loss.dtype),
        }
    return loss, metrics


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, equation (4): ``0.5 max((V - R)^2, (clip(V, V_old +- c) - R)^2)``.

    Returns ``(loss, metrics)``: ``loss`` is the sum over masked tokens; ``metrics`` are
    detached sums: ``value/clipped_tokens`` (the clipped branch strictly larger),
    ``value/error`` (sum of ``(V - R)^2``) and ``value/tokens``.
    """
    v = _masked(values, mask)
    v_old = _masked(old_values.to(v.dtype), mask)
    target = _masked(returns.to(v.dtype), mask)
    v_clipped = v_old + (v - v_old).clamp(-clip, clip)
    err_unclipped = (v - target) ** 2
    err_clipped = (v_clipped - target) ** 2
    loss = _masked(0.5 * torch.maximum(err_unclipped, err_clipped), mask).sum()
    with torch.no_grad():
        metrics = {
            "value/clipped_tokens": ((err_clipped > err_unclipped) & mask).sum().to(loss.dtype),
            "value/error": _masked(err_unclipped, mask).sum(),
            "value/tokens": mask.sum().to(loss.dtype),
        }
    return loss, metrics
