"""TP=2 and PP=2 give the same numbers as TP=1/PP=1 on the same initial weights.

All cases run in one pair of spawned gloo processes (megatron's import and the spawn are
the expensive part): for each case the processes first build the reference at TP=1, PP=1
(data parallel 2, both ranks fed the same batch so the DP-averaged gradient equals the
single-batch gradient), record loss, per-token log-probs at temperature 0.7, final hidden
states and the weights after one Adam step through ``make_trainable`` and megatron's
schedule; then re-initialise the layout at TP=2 or PP=2 (1F1B), build the model from a
*different* seed, load the reference's initial weights with ``shard_state_dict_for_tp``,
and repeat. The test reports maximum absolute differences per rank.
"""

from __future__ import annotations

import pytest
import torch

from tests.multiprocess import run_ranks

TOL = 1e-5
TEMPERATURE = 0.7
VOCAB = 128  # a multiple of 8*2: the padded vocabulary is the same at TP=1 and TP=2
MICRO_BATCHES, MICRO_BATCH, SEQ = 2, 2, 16

CASES = {
    # name: (model overrides, layout, critic)
    "llama_tp2": (dict(), dict(tensor_parallel=2), False),
    "qwen2_tp2": (dict(family="qwen2", qkv_bias=True, tie_word_embeddings=True), dict(tensor_parallel=2), False),
    "llama_pp2": (dict(), dict(pipeline_parallel=2), False),
    "qwen2_pp2": (dict(family="qwen2", qkv_bias=True, tie_word_embeddings=True), dict(pipeline_parallel=2), False),
    "critic_tp2": (dict(), dict(tensor_parallel=2), True),
}


def _micro_batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        {
            "tokens": torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=gen),
            "labels": torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=gen),
            "returns": torch.randn(MICRO_BATCH, SEQ, generator=gen),
        }
        for _ in range(MICRO_BATCHES)
    ]


def _value_loss(values: torch.Tensor, batch: dict[str, torch.Tensor]):
    v = values.squeeze(-1)
    loss = ((v - batch["returns"]) ** 2).mean()
    return loss, {"loss": loss, "values": v}


def _tensors(gpt: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in gpt.state_dict().items() if isinstance(v, torch.Tensor)}


def _train_once(model_overrides: dict, layout: dict, critic: bool, seed: int, init_sd: dict | None):
    """Build under ``layout``, optionally load ``init_sd``, one fwd/bwd + step. Returns everything to compare."""
    from carft_nemo.distributed.layout import ParallelConfig, initialize
    from carft_nemo.models.config import ModelConfig
    from carft_nemo.models.gpt import build_gpt_model
    from carft_nemo.models.sharding import full_state_dict, load_full_state_dict
    from carft_nemo.models.step import forward_backward, lm_loss
    from carft_nemo.training.optim import OptimConfig, make_trainable

    model_cfg = ModelConfig(preset="micro", vocab_size=VOCAB, **model_overrides)
    parallel = ParallelConfig(**layout)
    lay = initialize(
        parallel,
        seed=seed,
        num_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
    )
    gpt = build_gpt_model(model_cfg, parallel, value_head=critic)
    if init_sd is None:
        if critic:  # the head starts at zero; give it weights so values are not trivially equal
            gen = torch.Generator().manual_seed(7)
            with torch.no_grad():
                gpt.output_layer.weight.copy_(0.1 * torch.randn(gpt.output_layer.weight.shape, generator=gen))
                gpt.output_layer.bias.fill_(0.3)
        init_sd = full_state_dict(gpt)
    else:
        load_full_state_dict(gpt, init_sd)
    before = _tensors(gpt)
    # adam_eps large: Adam's first step is ~lr*g/(|g|+eps); a tiny eps would amplify 1e-9 gradient noise
    trainable = make_trainable(
        gpt, model_cfg, parallel, OptimConfig(lr=1e-2, adam_eps=1e-2, schedule="constant"), total_steps=1
    )
    trainable.zero_grad()
    loss_fn = _value_loss if critic else lm_loss(TEMPERATURE)
    metrics = forward_backward(trainable.model, _micro_batches(), loss_fn, capture_hidden=True)
    ok, grad_norm = trainable.step()
    assert ok, "optimizer step was skipped"
    after = _tensors(gpt)
    return lay, gpt, init_sd, metrics, before, after, grad_norm


def _compare_all(rank: int, world_size: int) -> dict[str, dict[str, float]]:
    from carft_nemo.models.sharding import shard_state_dict_for_tp

    report: dict[str, dict[str, float]] = {}
    for name, (overrides, layout, critic) in CASES.items():
        _, ref_gpt, init_sd, ref_metrics, _, ref_after, ref_norm = _train_once(overrides, {}, critic, 1234, None)
        lay, gpt, _, metrics, before, after, norm = _train_once(overrides, layout, critic, 999, init_sd)
        expected_after = shard_state_dict_for_tp(ref_after, gpt)
        out = {
            "weights_after_step": max((after[k] - expected_after[k]).abs().max().item() for k in after),
            "n_weights": float(len(after)),
            "weights_moved": max((after[k] - before[k]).abs().max().item() for k in after),
            "grad_norm": abs(norm - ref_norm),
        }
        if not critic:  # the built TP=1 model has exactly the parameters ModelConfig counts
            from carft_nemo.models.config import ModelConfig

            counted = ModelConfig(preset="micro", vocab_size=VOCAB, **overrides).num_parameters()
            out["param_count_gap"] = float(abs(sum(p.numel() for p in ref_gpt.parameters()) - counted))
        if lay.is_last_stage:
            keys = ("loss", "values", "hidden") if critic else ("loss", "logprobs", "hidden")
            for key in keys:
                out[key] = max((m[key] - r[key]).abs().max().item() for m, r in zip(metrics, ref_metrics))
            out["n_micro"] = float(len(metrics))
        report[name] = out
    return report


@pytest.fixture(scope="module")
def report() -> list[dict[str, dict[str, float]]]:
    return run_ranks(_compare_all, 2)


def _worst(report, case: str, key: str) -> float:
    values = [rank_report[case][key] for rank_report in report if key in rank_report[case]]
    assert values, f"no rank reported {key!r} for {case}"
    return max(values)


@pytest.mark.parametrize("case", ["llama_tp2", "qwen2_tp2", "llama_pp2", "qwen2_pp2"])
def test_policy_matches_single_device(report, case: str) -> None:
    for key in ("loss", "logprobs", "hidden", "weights_after_step", "grad_norm"):
        assert _worst(report, case, key) < TOL, f"{case}: {key} differs by {_worst(report, case, key):.3e}"
    # the step must have changed the weights, or "same weights after a step" proves nothing
    assert _worst(report, case, "weights_moved") > 1e-3
    assert _worst(report, case, "n_micro") == MICRO_BATCHES
    assert _worst(report, case, "param_count_gap") == 0


def test_critic_value_head_matches_under_tp2(report) -> None:
    for key in ("loss", "values", "hidden", "weights_after_step", "grad_norm"):
        assert _worst(report, "critic_tp2", key) < TOL, (
            f"critic: {key} differs by {_worst(report, 'critic_tp2', key):.3e}"
        )
    assert _worst(report, "critic_tp2", "weights_moved") > 1e-3


def test_pipeline_last_stage_only_reports_outputs(report) -> None:
    # PP=2: rank 0 is the first stage (no outputs), rank 1 the last (loss, hidden states)
    assert "hidden" not in report[0]["llama_pp2"] and "hidden" in report[1]["llama_pp2"]
