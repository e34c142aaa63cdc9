"""One actor update moves log-probs the way the advantages say (PPO and Dr.GRPO normalisers).

Runs the actor's real loss through megatron's schedule, DDP and Adam on a micro model:
a sequence with a positive advantage must become more likely, one with a negative advantage
less likely. Catches sign and alignment errors between advantages, masks and tokens.
"""

from __future__ import annotations

import pytest
import torch

from tests.multiprocess import run_ranks

VOCAB, B, S, PROMPT = 64, 4, 12, 4


def _logps_before_after(rank: int, world: int, constant_normalizer: float) -> tuple[list[float], list[float]]:
    from carft_nemo.distributed.layout import ParallelConfig, initialize, shutdown
    from carft_nemo.models.config import ModelConfig
    from carft_nemo.models.forward import unwrap
    from carft_nemo.models.gpt import build_gpt_model
    from carft_nemo.training.optim import OptimConfig, make_trainable
    from carft_nemo.workers.actor_loss import ActorTrainSettings, actor_loss, policy_outputs
    from carft_nemo.workers.model_worker import ModelWorker, on_token_positions

    model_cfg = ModelConfig(preset="micro", vocab_size=VOCAB)
    parallel = ParallelConfig()
    initialize(
        parallel,
        seed=1234,
        num_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
    )
    try:
        trainable = make_trainable(
            build_gpt_model(model_cfg, parallel), model_cfg, parallel, OptimConfig(lr=1e-3, schedule="constant"), 10
        )
        worker = ModelWorker()
        worker.trainable, worker.model = trainable, trainable.model
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, VOCAB, (B, S), generator=g)
        mask = torch.zeros(B, S - 1, dtype=torch.bool)
        mask[:, PROMPT - 1 :] = True  # response = tokens[PROMPT:]
        fn = policy_outputs(unwrap(trainable.model), ("logprobs",), 1.0, VOCAB)
        rows = on_token_positions({"tokens": tokens})
        before = worker.collect_forward(rows, fn, B, hidden_to_loss=True)["logprobs"][:, :-1]
        advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None].expand(B, S - 1) * mask
        batch = {"tokens": tokens, "action_mask": mask, "old_logprobs": before * mask, "advantages": advantages}
        settings = ActorTrainSettings(epochs=1, mini_batch_rows=B, seed=0, constant_normalizer=constant_normalizer)

        def make_loss(mini, num_micro):
            normalizer = constant_normalizer or float(mini["action_mask"].sum())
            return actor_loss(unwrap(trainable.model), settings, VOCAB, None, mean_term_weight=0.0), normalizer

        worker.train_epochs(
            on_token_positions(batch),
            epochs=1,
            mini_batch_rows=B,
            micro_batch_size=2,
            seed=0,
            make_loss=make_loss,
            hidden_to_loss=True,
        )
        after = worker.collect_forward(rows, fn, B, hidden_to_loss=True)["logprobs"][:, :-1]
        return (before * mask).sum(1).tolist(), (after * mask).sum(1).tolist()
    finally:
        shutdown()


@pytest.mark.parametrize("constant_normalizer", [0.0, 64.0], ids=["ppo_token_mean", "drgrpo_constant"])
def test_update_follows_the_advantage_sign(constant_normalizer):
    ((before, after),) = run_ranks(_logps_before_after, 1, constant_normalizer)
    for row, sign in enumerate([1, -1, 1, -1]):
        assert (after[row] - before[row]) * sign > 0, (row, before, after)
