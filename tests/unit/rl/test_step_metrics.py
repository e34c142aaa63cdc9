"""A step's training metrics from the workers' sums."""

import pytest

from carft_nemo.rl.step_metrics import train_metrics

ACTOR = {
    "loss": 3.0,
    "updates": 2.0,
    "policy/tokens": 10.0,
    "policy/clipped_tokens": 1.0,
    "policy/approx_kl": 0.5,
    "policy/ratio": 10.2,
    "policy/entropy": 15.0,
    "grad_norm": 0.7,
    "updates_skipped": 0.0,
    "count/micro_batches": 4.0,
    "contrastive/loss": 2.0,
    "contrastive/num_positive": 6.0,
}
CRITIC = {"value/tokens": 20.0, "value/error": 4.0, "value/clipped_tokens": 2.0, "grad_norm": 0.3}


def test_means_per_token_update_and_micro_batch():
    out = train_metrics(ACTOR, CRITIC)
    assert out["policy_updated"] == 1.0
    assert out["actor_loss"] == 1.5  # per update
    assert out["clip_fraction"] == 0.1 and out["approx_kl"] == 0.05 and out["entropy"] == 1.5
    assert out["ratio_mean"] == pytest.approx(1.02)
    assert out["value_loss"] == 0.1 and out["value_clip_fraction"] == 0.1  # 0.5 * error / tokens
    assert out["critic_grad_norm"] == 0.3 and out["grad_norm"] == 0.7
    assert out["contrastive/loss"] == 0.5 and out["contrastive/num_positive"] == 1.5  # per micro-batch
    assert "contrastive/negative_loss" not in out


def test_critic_warmup_round_and_shared_value_head():
    warmup = train_metrics(None, CRITIC)
    assert warmup["policy_updated"] == 0.0 and "actor_loss" not in warmup and warmup["value_loss"] == 0.1
    shared = train_metrics({**ACTOR, "value/tokens": 10.0, "value/error": 1.0, "value/clipped_tokens": 0.0}, None)
    assert shared["value_loss"] == 0.05 and "critic_grad_norm" not in shared
