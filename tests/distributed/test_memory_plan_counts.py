"""The planner's parameter counts are the built model's, rank by rank (TP 2, PP 2, RL heads, critic)."""

from __future__ import annotations

import pytest

from tests.multiprocess import run_ranks


def _counts(rank: int, world: int, tp: int, pp: int, role: str):
    from carft_nemo.distributed.layout import ParallelConfig, initialize, shutdown
    from carft_nemo.models.config import ModelConfig
    from carft_nemo.models.gpt import build_gpt_model
    from carft_nemo.models.heads import attach_policy_heads
    from carft_nemo.planning.memory import parameter_counts

    model = ModelConfig(preset="micro", vocab_size=61)  # padded to 64 (x TP)
    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    layout = initialize(parallel, seed=1, **model.layout_dims)
    try:
        gpt = build_gpt_model(model, parallel, value_head=role == "critic")
        if role == "actor":
            attach_policy_heads(gpt, shared_value_head=True, contrastive_dim=8)
        built = sum(p.numel() for p in gpt.parameters())
        heads = {"shared_value_head": True, "projection_dim": 8} if role == "actor" else {}
        counts = parameter_counts(model, tp, value_head=role == "critic", **heads)
        return built, counts.on_stage(model, parallel, layout.pp_rank)
    finally:
        shutdown()


@pytest.mark.parametrize("tp,pp,role", [(2, 1, "sft"), (1, 2, "actor"), (2, 1, "critic")])
def test_planned_parameters_are_the_built_ones(tp, pp, role):
    for built, planned in run_ranks(_counts, tp * pp, tp, pp, role):
        assert planned == built
