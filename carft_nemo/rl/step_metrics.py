"""A step's training metrics from the sums the actor and critic workers return (pure)."""

from __future__ import annotations

CONTRASTIVE_KEYS = (
    "contrastive/loss",
    "contrastive/positive_loss",
    "contrastive/negative_loss",
    "contrastive/num_positive",
    "contrastive/num_negative",
)
PROBE_KEYS = ("contrastive/grad_ratio", "contrastive/grad_cosine")


def train_metrics(actor: dict[str, float] | None, critic: dict[str, float] | None) -> dict[str, float]:
    """Means per token / update / micro-batch from the workers' sums (``PolicyWorker.train``,
    ``ValueWorker.train``).

    ``actor`` is None in a critic warm-up round (the policy was not updated); value metrics
    come from the separate critic, else from the actor's shared value head.
    """
    out: dict[str, float] = {"policy_updated": float(actor is not None)}
    if actor is not None:
        tokens = max(actor.get("policy/tokens", 0.0), 1.0)
        out.update(
            {
                "actor_loss": actor["loss"] / max(actor["updates"], 1.0),
                "clip_fraction": actor.get("policy/clipped_tokens", 0.0) / tokens,
                "approx_kl": actor.get("policy/approx_kl", 0.0) / tokens,
                "ratio_mean": actor.get("policy/ratio", 0.0) / tokens,
                "entropy": actor.get("policy/entropy", 0.0) / tokens,
                "grad_norm": actor["grad_norm"],
                "updates_skipped": actor["updates_skipped"],
                "lr": actor.get("lr", 0.0),  # the last update's (the collapse guard's scale included)
            }
        )
    value_source = critic if critic is not None else (actor or {})
    if "value/tokens" in value_source:
        value_tokens = max(value_source["value/tokens"], 1.0)
        out["value_loss"] = 0.5 * value_source["value/error"] / value_tokens
        out["value_clip_fraction"] = value_source["value/clipped_tokens"] / value_tokens
    if critic is not None:
        out["critic_grad_norm"] = critic["grad_norm"]
        out["critic_lr"] = critic.get("lr", 0.0)
    micro_batches = max((actor or {}).get("count/micro_batches", 0.0), 1.0)
    for key in CONTRASTIVE_KEYS:
        if actor is not None and key in actor:
            out[key] = actor[key] / micro_batches
    for key in PROBE_KEYS:  # already figures of one micro-batch (workers/gradient_probe.py)
        if actor is not None and key in actor:
            out[key] = actor[key]
    return out


__all__ = ["CONTRASTIVE_KEYS", "PROBE_KEYS", "train_metrics"]
