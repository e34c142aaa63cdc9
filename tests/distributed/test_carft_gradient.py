"""CARFT's contrastive loss reaches the policy's parameters, in both critic layouts, at TP=1 and TP=2.

The actor's real training loss (:func:`carft_nemo.workers.actor_loss.actor_loss`) runs through
megatron's schedule and DDP on a micro model with the RL heads attached. Advantages are 0 and
the value-loss weight is 0, so the only gradient source is the contrastive term: with it on,
backbone weights (first decoder layer, word embeddings) get a gradient; with it off they get
exactly none. That makes the check falsifiable in both directions.
"""

from __future__ import annotations

import pytest
import torch

from tests.multiprocess import run_ranks

VOCAB, B, S, SA, PROMPT = 64, 4, 14, 12, 5
CASES = {
    "tp1_separate": (1, "separate"),
    "tp1_shared": (1, "shared"),
    "tp2_separate": (2, "separate"),
    "tp2_shared": (2, "shared"),
}


def _batch(layout: str) -> dict[str, torch.Tensor]:
    from carft_nemo.data.tokenization import EncodedExample
    from carft_nemo.generation.rollout import Rollout
    from carft_nemo.rl.experience import AnnotatedBatch, lcs_split

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, VOCAB, (PROMPT,), generator=g).tolist() for _ in range(B)]
    responses = [torch.randint(1, 6, (S - PROMPT - i,), generator=g).tolist() for i in range(B)]
    rollout = Rollout(prompts, responses, [[0.0] * len(r) for r in responses], [True] * B).to_batch(0)
    ann = [
        EncodedExample(
            str(i),
            p + torch.randint(1, 6, (SA - PROMPT,), generator=g).tolist(),
            [0] * PROMPT + [1] * (SA - PROMPT),
            PROMPT,
        )
        for i, p in enumerate(prompts)
    ]
    annotated = AnnotatedBatch.build(ann, 0)
    mask = rollout.response_mask[:, 1:]
    batch = {
        "tokens": rollout.tokens,
        "action_mask": mask,
        "old_logprobs": torch.zeros(B, S - 1),
        "advantages": torch.zeros(B, S - 1),
        "response_mask": rollout.response_mask,
        "correct": torch.tensor([True, True, False, False]),
        "ann_embeddings": torch.randn(B, SA, 8, generator=g),
        "ann_values": torch.randn(B, SA, generator=g),
        "ann_cot_mask": annotated.cot_mask,
        **lcs_split(annotated, rollout),
    }
    if layout == "shared":
        batch.update(old_values=torch.zeros(B, S - 1), returns=torch.zeros(B, S - 1))
    else:
        batch["critic_token_values"] = torch.randn(B, S, generator=g)
    return batch


def _grad_norms(tp: int, layout: str, contrastive_on: bool) -> dict[str, float]:
    from carft_nemo.algorithms.contrastive import ContrastiveConfig
    from carft_nemo.distributed.layout import ParallelConfig, initialize
    from carft_nemo.models.config import ModelConfig
    from carft_nemo.models.forward import unwrap
    from carft_nemo.models.gpt import build_gpt_model
    from carft_nemo.models.heads import attach_policy_heads
    from carft_nemo.training.forward_backward import run_forward_backward
    from carft_nemo.training.optim import OptimConfig, make_trainable
    from carft_nemo.workers.actor_loss import ActorTrainSettings, actor_loss
    from carft_nemo.workers.model_worker import on_token_positions

    model_cfg = ModelConfig(preset="micro", vocab_size=VOCAB)
    parallel = ParallelConfig(tensor_parallel=tp)
    layout_info = initialize(
        parallel,
        seed=1234,
        num_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
    )
    gpt = build_gpt_model(model_cfg, parallel)
    attach_policy_heads(gpt, shared_value_head=layout == "shared", contrastive_dim=8)
    trainable = make_trainable(gpt, model_cfg, parallel, OptimConfig(lr=1e-3), 1)
    settings = ActorTrainSettings(
        epochs=1,
        mini_batch_rows=B,
        seed=0,
        shared_value=layout == "shared",
        value_loss_coef=0.0,
        contrastive=ContrastiveConfig(enabled=contrastive_on, variant="v9", coef=1.0, projection_dim=8),
    )
    dp_group = layout_info.group("dp")
    dp = layout_info.data_parallel
    rows = B // dp
    mine = {k: v[layout_info.dp_rank * rows : (layout_info.dp_rank + 1) * rows] for k, v in _batch(layout).items()}
    trainable.zero_grad()
    normalizer = float(_batch(layout)["action_mask"].sum())
    run_forward_backward(
        trainable.model,
        on_token_positions(mine),
        loss_fn=actor_loss(unwrap(trainable.model), settings, VOCAB, dp_group, mean_term_weight=normalizer / (dp * 1)),
        normalizer=normalizer,
        micro_batch_size=rows,
        hidden_to_loss=True,
    )
    model = unwrap(trainable.model)
    grad = lambda p: float(p.main_grad.norm())  # noqa: E731 - megatron DDP accumulates into main_grad
    return {
        "decoder_layer0": sum(grad(p) for p in model.decoder.layers[0].parameters()),
        "word_embeddings": grad(model.embedding.word_embeddings.weight),
        "contrastive_head": grad(model.contrastive_head.proj.weight),
    }


def _all_cases(rank: int, world: int) -> dict:
    from carft_nemo.distributed.layout import shutdown

    out = {}
    try:
        for name, (tp, layout) in CASES.items():
            out[name] = {"on": _grad_norms(tp, layout, True), "off": _grad_norms(tp, layout, False)}
    finally:
        shutdown()
    return out


@pytest.fixture(scope="module")
def norms() -> list[dict]:
    return run_ranks(_all_cases, 2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_contrastive_gradient_reaches_policy(norms, case):
    for rank_norms in norms:
        on, off = rank_norms[case]["on"], rank_norms[case]["off"]
        assert on["decoder_layer0"] > 1e-6 and on["word_embeddings"] > 1e-6, on
        assert on["contrastive_head"] > 1e-6, on
        assert off["decoder_layer0"] == 0.0 and off["word_embeddings"] == 0.0, off
