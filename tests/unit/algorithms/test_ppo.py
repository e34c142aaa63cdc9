"""ReFT PPO pieces against hand-computed values and a naive per-row loop (float64, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from carft_nemo.algorithms.ppo import (
    clipped_policy_loss,
    clipped_value_loss,
    gae_advantages,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
)

F64 = torch.float64
T, F = True, False


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def _m(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def _close(actual: torch.Tensor, expected, tol: float = 1e-12) -> None:
    torch.testing.assert_close(actual, _t(expected) if not torch.is_tensor(expected) else expected, rtol=tol, atol=tol)


# ---------------------------------------------------------------- kl_penalized_rewards


def test_kl_rewards_hand_computed_score_at_last_response_token():
    mask = _m([[F, T, T, F], [F, F, F, F]])
    logprobs = _t([[-9.0, -1.0, -2.0, -math.inf], [-1.0, -2.0, -3.0, -4.0]])
    ref = _t([[5.0, -1.5, -1.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    rewards, kl = kl_penalized_rewards(_t([1.0, 5.0]), logprobs, ref, mask, kl_coef=0.1)
    # row 0: kl = (-1 - -1.5, -2 - -1) = (0.5, -1.0) on cols 1..2
    #        r  = (-0.1 * 0.5, -0.1 * -1.0 + score 1.0) = (-0.05, 1.1); score goes to col 2
    # row 1: empty mask -> no kl, and the score 5.0 is dropped
    _close(kl, [[0.0, 0.5, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    _close(rewards, [[0.0, -0.05, 1.1, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert rewards.dtype == F64 and kl.dtype == F64


def test_kl_rewards_keeps_float32_and_full_row():
    mask = _m([[T, T, T]])
    lp = torch.tensor([[-1.0, -1.0, -1.0]])
    rewards, kl = kl_penalized_rewards(torch.tensor([2.0]), lp, lp - 1.0, mask, kl_coef=0.5)
    # kl = 1 everywhere, r = -0.5 per token, +2 at the last column
    assert rewards.dtype == torch.float32
    torch.testing.assert_close(rewards, torch.tensor([[-0.5, -0.5, 1.5]]))


# ---------------------------------------------------------------- gae_advantages


def test_gae_hand_computed_gamma_one():
    r, v, mask = _t([[0.1, -0.2, 1.0]]), _t([[0.5, 0.4, 0.8]]), _m([[T, T, T]])
    adv, ret = gae_advantages(r, v, mask, gamma=1.0, lam=0.95)
    # t=2 (last, V_3 = 0): delta = 1.0 - 0.8 = 0.2;               A = 0.2
    # t=1: delta = -0.2 + 0.8 - 0.4 = 0.2;                          A = 0.2 + 0.95 * 0.2 = 0.39
    # t=0: delta = 0.1 + 0.4 - 0.5 = 0.0;                           A = 0.0 + 0.95 * 0.39 = 0.3705
    # R = A + V = (0.8705, 0.79, 1.0)
    _close(adv, [[0.3705, 0.39, 0.2]])
    _close(ret, [[0.8705, 0.79, 1.0]])


def test_gae_hand_computed_gamma_below_one_with_prompt_and_padding():
    # Row 0: prompt cols 0-1, response cols 2-3, padding cols 4-5 (garbage outside the mask).
    # Row 1: empty mask.
    mask = _m([[F, F, T, T, F, F], [F, F, F, F, F, F]])
    r = _t([[9.0, 9.0, 0.0, 2.0, 9.0, 9.0], [1.0] * 6])
    v = _t([[7.0, 7.0, 1.0, 0.5, 7.0, math.nan], [3.0] * 6])
    adv, ret = gae_advantages(r, v, mask, gamma=0.5, lam=0.8)
    # t=3 (last): delta = 2.0 + 0 - 0.5 = 1.5;              A = 1.5,  R = 1.5 + 0.5 = 2.0
    # t=2: delta = 0.0 + 0.5 * 0.5 - 1.0 = -0.75;           A = -0.75 + 0.5 * 0.8 * 1.5 = -0.15
    #                                                       R = -0.15 + 1.0 = 0.85
    _close(adv, [[0, 0, -0.15, 1.5, 0, 0], [0] * 6])
    _close(ret, [[0, 0, 0.85, 2.0, 0, 0], [0] * 6])


def test_gae_is_detached():
    v = _t([[0.5, 0.4]]).requires_grad_(True)
    adv, ret = gae_advantages(_t([[0.0, 1.0]]), v, _m([[T, T]]))
    assert not adv.requires_grad and not ret.requires_grad


def _gae_reference(r, v, mask, gamma, lam):
    """Naive per-row loop over the response span, plain Python floats."""
    adv = [[0.0] * len(row) for row in r]
    for b in range(len(r)):
        idx = [j for j, on in enumerate(mask[b]) if on]
        running = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            next_v = v[b][idx[k + 1]] if k + 1 < len(idx) else 0.0
            delta = r[b][t] + gamma * next_v - v[b][t]
            running = delta + gamma * lam * running
            adv[b][t] = running
    ret = [[adv[b][t] + v[b][t] if mask[b][t] else 0.0 for t in range(len(r[b]))] for b in range(len(r))]
    return adv, ret


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.7, 0.3)])
def test_gae_random_vs_reference_loop(seed, gamma, lam):
    g = torch.Generator().manual_seed(seed)
    b, t = 6, 9
    r, v = torch.randn(b, t, generator=g, dtype=F64), torch.randn(b, t, generator=g, dtype=F64)
    starts = torch.randint(0, t, (b,), generator=g)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    lengths[0], starts[1], lengths[1] = 0, 0, t  # an empty row and a full row
    cols = torch.arange(t)
    mask = (cols >= starts[:, None]) & (cols < (starts + lengths)[:, None])
    adv, ret = gae_advantages(r, v, mask, gamma=gamma, lam=lam)
    exp_adv, exp_ret = _gae_reference(r.tolist(), v.tolist(), mask.tolist(), gamma, lam)
    _close(adv, exp_adv)
    _close(ret, exp_ret)


# ---------------------------------------------------------------- masked mean / whiten


def test_masked_mean_hand_and_empty():
    x, mask = _t([[1.0, 2.0, 100.0], [3.0, math.inf, 4.0]]), _m([[T, T, F], [T, F, T]])
    assert masked_mean(x, mask).item() == pytest.approx(2.5, abs=1e-15)  # (1+2+3+4)/4
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_masked_whiten_hand_computed():
    x, mask = _t([[1.0, 2.0, 100.0], [3.0, -50.0, 4.0]]), _m([[T, T, F], [T, F, T]])
    # masked entries 1, 2, 3, 4: mean 2.5, deviations -1.5, -0.5, 0.5, 1.5,
    # sum of squares 5, biased var 5/4, unbiased var 5/3 -> divide by sqrt(5/3)
    s = math.sqrt(3.0 / 5.0)
    out = masked_whiten(x, mask, eps=0.0)
    _close(out, [[-1.5 * s, -0.5 * s, 0.0], [0.5 * s, 0.0, 1.5 * s]])
    out = masked_whiten(x, mask, shift_mean=False, eps=0.0)
    _close(out, [[-1.5 * s + 2.5, -0.5 * s + 2.5, 0.0], [0.5 * s + 2.5, 0.0, 1.5 * s + 2.5]])


def test_masked_whiten_empty_and_single_entry():
    x = _t([[1.0, 2.0], [3.0, 4.0]])
    _close(masked_whiten(x, torch.zeros(2, 2, dtype=torch.bool)), [[0.0, 0.0], [0.0, 0.0]])
    # n = 1: no n/(n-1) correction, the variance is 0 and x - mean = 0
    _close(masked_whiten(x, _m([[F, T], [F, F]])), [[0.0, 0.0], [0.0, 0.0]])
    # shift_mean=False with one entry gives the mean back: 2
    _close(masked_whiten(x, _m([[F, T], [F, F]]), shift_mean=False), [[0.0, 2.0], [0.0, 0.0]])


# ---------------------------------------------------------------- clipped_policy_loss


def _policy_case():
    """Row 0: five response tokens + one pad; row 1 empty with garbage log-probs.

    token  rho   A    -A*rho   -A*clip(rho)   max    clip active
      0    1.1   +2   -2.2      -2.2          -2.2    no (inside)
      1    1.5   +1   -1.5      -1.2          -1.2    yes
      2    1.5   -1   +1.5      +1.2          +1.5    no
      3    0.5   -2   +1.0      +1.6          +1.6    yes
      4    0.5   +3   -1.5      -2.4          -1.5    no
    sum = -2.2 - 1.2 + 1.5 + 1.6 - 1.5 = -1.8
    """
    rho = [1.1, 1.5, 1.5, 0.5, 0.5]
    old = _t([[-1.0, -2.0, -0.5, -1.5, -3.0, -1.0], [0.0] * 6])
    logp = old.clone()
    logp[0, :5] += torch.log(_t(rho))
    logp[1] = _t([math.inf, -math.inf, 50.0, 0.0, 0.0, 0.0])
    adv = _t([[2.0, 1.0, -1.0, -2.0, 3.0, 99.0], [7.0] * 6])
    mask = _m([[T, T, T, T, T, F], [F] * 6])
    return logp.requires_grad_(True), old, adv, mask


def test_policy_loss_hand_computed_and_metrics():
    logp, old, adv, mask = _policy_case()
    loss, metrics = clipped_policy_loss(logp, old, adv, mask, clip_ratio=0.2)
    assert loss.item() == pytest.approx(-1.8, abs=1e-12)
    assert metrics["policy/clipped_tokens"].item() == 2
    assert metrics["policy/tokens"].item() == 5
    assert metrics["policy/ratio"].item() == pytest.approx(1.1 + 1.5 + 1.5 + 0.5 + 0.5, abs=1e-12)
    kl = 0.5 * (math.log(1.1) ** 2 + 2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2)
    assert metrics["policy/approx_kl"].item() == pytest.approx(kl, abs=1e-12)
    assert all(not m.requires_grad for m in metrics.values())


def test_policy_loss_gradient_zero_on_clipped_tokens():
    logp, old, adv, mask = _policy_case()
    loss, _ = clipped_policy_loss(logp, old, adv, mask, clip_ratio=0.2)
    loss.backward()
    # d(-A rho)/d logp = -A rho on unclipped tokens; 0 on clipped tokens, padding, empty row
    _close(logp.grad, [[-2.2, 0.0, 1.5, 0.0, -1.5, 0.0], [0.0] * 6])


def _policy_reference(logp, old, adv, mask, eps):
    total, clipped = 0.0, 0
    for b in range(len(logp)):
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            rho = math.exp(logp[b][t] - old[b][t])
            a, c = -adv[b][t] * rho, -adv[b][t] * min(max(rho, 1 - eps), 1 + eps)
            total += max(a, c)
            clipped += c > a
    return total, clipped


@pytest.mark.parametrize("seed", [0, 1])
def test_policy_loss_random_vs_reference_loop(seed):
    g = torch.Generator().manual_seed(seed)
    shape = (5, 7)
    old = torch.randn(shape, generator=g, dtype=F64)
    logp = old + 0.4 * torch.randn(shape, generator=g, dtype=F64)
    adv = torch.randn(shape, generator=g, dtype=F64)
    mask = torch.rand(shape, generator=g) > 0.3
    loss, metrics = clipped_policy_loss(logp, old, adv, mask, clip_ratio=0.2)
    total, clipped = _policy_reference(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2)
    assert loss.item() == pytest.approx(total, abs=1e-12)
    assert metrics["policy/clipped_tokens"].item() == clipped
    assert metrics["policy/tokens"].item() == int(mask.sum())


# ---------------------------------------------------------------- clipped_value_loss


def test_value_loss_hand_computed_both_branches():
    # c = 0.2, V_clip = clip(V, V_old - 0.2, V_old + 0.2)
    # tok  V    V_old  R     V_clip  (V-R)^2  (Vc-R)^2  0.5*max  clipped branch larger
    #  0   1.0  0.9    2.0   1.0     1.0      1.0       0.5      no (tie)
    #  1   1.5  1.0    0.0   1.2     2.25     1.44      1.125    no
    #  2   1.5  1.0    2.0   1.2     0.25     0.64      0.32     yes
    #  3   0.0  1.0    0.5   0.8     0.25     0.09      0.125    no
    #  4   0.0  1.0   -1.0   0.8     1.0      3.24      1.62     yes
    # sum = 0.5 + 1.125 + 0.32 + 0.125 + 1.62 = 3.69; error = 1 + 2.25 + 0.25 + 0.25 + 1 = 4.75
    values = _t([[1.0, 1.5, 1.5, 0.0, 0.0, 8.0]]).requires_grad_(True)
    old = _t([[0.9, 1.0, 1.0, 1.0, 1.0, math.nan]])
    ret = _t([[2.0, 0.0, 2.0, 0.5, -1.0, -8.0]])
    mask = _m([[T, T, T, T, T, F]])
    loss, metrics = clipped_value_loss(values, old, ret, mask, clip=0.2)
    assert loss.item() == pytest.approx(3.69, abs=1e-12)
    assert metrics["value/clipped_tokens"].item() == 2
    assert metrics["value/error"].item() == pytest.approx(4.75, abs=1e-12)
    assert metrics["value/tokens"].item() == 5
    loss.backward()
    # unclipped tokens: d/dV 0.5 (V - R)^2 = V - R; clipped tokens and padding: 0
    _close(values.grad, [[-1.0, 1.5, 0.0, -0.5, 0.0, 0.0]])
