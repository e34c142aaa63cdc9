"""Context parallelism in the RL workers (gloo on loopback): the actor's and critic's forward
outputs and one PPO + CARFT update at CP=2 and TP=2 x CP=2 equal CP=1 on the same weights.

The workers run their real ``forward`` and ``train`` methods (the controller's calls), on a
batch with a shared value head and CARFT's v9 (positive and negative signals, no clamp, so
both contrastive terms have a gradient): log-probs, values, CoT projections, the losses and
their metrics, and the weights after the optimizer step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.multiprocess import run_ranks

VOCAB, B, S, SA, D = 64, 4, 21, 15, 8  # S, SA not multiples of 2 x CP: the workers pad
PROMPT = [4, 6, 3, 5]
LENGTHS = [21, 14, 17, 9]


def _batches() -> tuple[dict, dict]:
    """(rows for the forward calls, the actor's training batch), the same on every rank."""
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(1, VOCAB, (B, S), generator=g)
    lengths = torch.tensor(LENGTHS)
    cols = torch.arange(S)[None, :]
    response = (cols >= torch.tensor(PROMPT)[:, None]) & (cols < lengths[:, None])
    tokens = tokens * (cols < lengths[:, None])
    action = response[:, 1:]
    ann_cols = torch.arange(SA)[None, :]
    ann_cot = (ann_cols >= 3) & (ann_cols < torch.tensor([15, 11, 12, 8])[:, None])
    ann_common = ann_cot & (torch.rand(B, SA, generator=g) > 0.5)
    gen_common = response & (torch.rand(B, S, generator=g) > 0.5)
    train = {
        "tokens": tokens,
        "action_mask": action,
        "old_logprobs": (torch.randn(B, S - 1, generator=g).clamp(-3, 0) - 1.0) * action,
        "advantages": torch.randn(B, S - 1, generator=g) * action,
        "old_values": torch.randn(B, S - 1, generator=g) * action,
        "returns": torch.randn(B, S - 1, generator=g) * action,
        "response_mask": response,
        "correct": torch.tensor([True, False, True, False]),
        "critic_token_values": torch.randn(B, S, generator=g),
        "ann_embeddings": torch.randn(B, SA, D, generator=g),
        "ann_values": torch.randn(B, SA, generator=g),
        "ann_cot_mask": ann_cot,
        "ann_common": ann_common,
        "gen_common": gen_common,
        "lcs_length": ann_common.sum(1),
    }
    return {"tokens": tokens, "lengths": lengths}, train


def _round(rank: int, world: int, tp: int, cp: int, initial: dict | None, packed: bool = False):
    """Actor and critic at TP=tp, CP=cp (rows packed into bins if ``packed``): forward outputs, one
    update each, the weights after it.

    Returns (outputs, metrics, weights after): full weights at CP=1 (with the initial ones),
    else the largest difference of this rank's shard from ``initial['after']``.
    """
    from carft_nemo.algorithms.contrastive import ContrastiveConfig
    from carft_nemo.data.packing import PackingConfig
    from carft_nemo.distributed.layout import ParallelConfig, initialize, shutdown
    from carft_nemo.models.config import ModelConfig
    from carft_nemo.models.gpt import build_gpt_model
    from carft_nemo.models.heads import attach_policy_heads
    from carft_nemo.models.sharding import full_state_dict, load_full_state_dict, shard_state_dict_for_tp
    from carft_nemo.training.optim import OptimConfig, make_trainable
    from carft_nemo.workers.actor import ActorSpec, ActorWorker
    from carft_nemo.workers.actor_loss import ActorTrainSettings
    from carft_nemo.workers.critic import CriticSpec, CriticTrainSettings, CriticWorker

    model_cfg = ModelConfig(preset="micro", vocab_size=VOCAB)
    parallel = ParallelConfig(tensor_parallel=tp, context_parallel=cp)
    heads = {"num_attention_heads": model_cfg.num_attention_heads, "num_query_groups": model_cfg.num_query_groups}
    layout = initialize(parallel, seed=1234, num_layers=model_cfg.num_layers, **heads)
    optim = OptimConfig(lr=1e-3, schedule="constant")
    packing = PackingConfig(enabled=packed, max_tokens=32 if packed else 0)  # two rows a bin
    rows, batch = _batches()
    try:
        workers, start = {}, {}
        for role in ("actor", "critic"):
            gpt = build_gpt_model(model_cfg, parallel, value_head=role == "critic")
            if role == "actor":
                attach_policy_heads(gpt, shared_value_head=True, contrastive_dim=D)
            if initial is not None:
                load_full_state_dict(gpt, {k: torch.from_numpy(v) for k, v in initial[role].items()})
            start[role] = full_state_dict(gpt) if cp == 1 and tp == 1 else None
            worker = ActorWorker() if role == "actor" else CriticWorker()
            worker.layout = layout
            worker.trainable = make_trainable(gpt, model_cfg, parallel, optim, 10)
            worker.model = worker.trainable.model
            if role == "actor":
                worker.spec = ActorSpec(
                    model_cfg, parallel, "", "", optim, micro_batch_size=4, contrastive_dim=D, packing=packing
                )
                worker.vocab_size = VOCAB
            else:
                worker.spec = CriticSpec(model_cfg, parallel, optim, "", micro_batch_size=4, packing=packing)
            workers[role] = worker
        actor, critic = workers["actor"], workers["critic"]
        outputs = actor.forward(rows, outputs=("logprobs", "values", "embeddings"))
        outputs["critic_values"] = critic.forward(rows)["values"]
        cl = ContrastiveConfig(enabled=True, variant="v9", coef=0.5, clamp_positive_similarity=None)
        settings = ActorTrainSettings(epochs=1, mini_batch_rows=B, seed=3, shared_value=True, contrastive=cl)
        metrics = {"actor": actor.train(batch, settings)}
        critic_batch = {k: batch[k] for k in ("tokens", "action_mask", "old_values", "returns")}
        metrics["critic"] = critic.train(critic_batch, CriticTrainSettings(epochs=1, mini_batch_rows=B, seed=3))
        outputs = {k: v.numpy() for k, v in outputs.items()}
        after = {role: full_state_dict(w.model) for role, w in workers.items()}
        if initial is None:
            as_numpy = lambda sd: {k: v.numpy() for k, v in sd.items()}  # noqa: E731
            weights = {"start": {r: as_numpy(sd) for r, sd in start.items()}}
            return outputs, metrics, {**weights, "after": {r: as_numpy(sd) for r, sd in after.items()}}
        worst = 0.0
        for role, w in workers.items():
            expected = shard_state_dict_for_tp(
                {k: torch.from_numpy(v) for k, v in initial["after"][role].items()}, w.model
            )
            worst = max(worst, *(float((after[role][k] - expected[k]).abs().max()) for k in after[role]))
        return outputs, metrics, worst
    finally:
        shutdown()


@pytest.fixture(scope="module")
def cp1_round():
    ((outputs, metrics, weights),) = run_ranks(_round, 1, 1, 1, None)
    return outputs, metrics, weights


@pytest.mark.parametrize(
    "tp,cp,packed", [(1, 2, False), (2, 2, False), (1, 2, True)], ids=["cp2", "tp2_cp2", "cp2_packed"]
)
def test_ppo_and_carft_with_context_parallelism_equal_cp1(cp1_round, tp, cp, packed):
    outputs, metrics, weights = cp1_round
    initial = {**weights["start"], "after": weights["after"]}
    assert metrics["actor"]["contrastive/num_positive"] == 2 and metrics["actor"]["contrastive/num_negative"] == 2
    assert metrics["actor"]["contrastive/loss"] != 0.0
    results = run_ranks(_round, tp * cp, tp, cp, initial, packed)
    for cp_outputs, cp_metrics, worst in results:
        for key, expected in outputs.items():
            valid = np.isfinite(expected)
            np.testing.assert_allclose(cp_outputs[key][valid], expected[valid], rtol=1e-5, atol=1e-5, err_msg=key)
        for role in ("actor", "critic"):
            for key in ("loss", "grad_norm", "contrastive/loss", "contrastive/positive_loss",
                        "contrastive/negative_loss", "policy/entropy", "count/micro_batches", "updates"):  # fmt: skip
                if key in metrics[role]:
                    assert cp_metrics[role][key] == pytest.approx(metrics[role][key], rel=1e-5, abs=1e-6), (role, key)
        assert worst < 1e-5, worst
