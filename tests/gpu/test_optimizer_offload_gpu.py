"""Optimizer offload (``parallel.optimizer_offload_fraction``) on a GPU with Transformer Engine:
steps with half or all of the Adam state in host memory give the weights that no offload gives,
and the offloaded state lives on the CPU."""

from __future__ import annotations

import pytest
import torch

from carft_nemo import compat
from tests.multiprocess import run_ranks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not compat.transformer_engine_available(), reason="needs Transformer Engine"),
]
VOCAB, B, S, STEPS, LR = 128, 4, 64, 5, 1e-2


def _train(rank: int, world: int, offload: float) -> tuple[dict, dict, list[str]]:
    """``STEPS`` SFT steps of the micro preset in bf16: (weights before, after, devices of the Adam state)."""
    from carft_nemo.algorithms.sft import masked_token_nll_sum, shift_for_next_token
    from carft_nemo.distributed.layout import ParallelConfig, initialize, shutdown
    from carft_nemo.models.config import ModelConfig
    from carft_nemo.models.gpt import build_gpt_model
    from carft_nemo.models.logprobs import token_logprobs
    from carft_nemo.models.sharding import full_state_dict
    from carft_nemo.training.forward_backward import run_forward_backward
    from carft_nemo.training.optim import OptimConfig, make_trainable

    cfg = ModelConfig(preset="micro", vocab_size=VOCAB, bf16=True)
    parallel = ParallelConfig(use_distributed_optimizer=True, optimizer_offload_fraction=offload)
    initialize(parallel, seed=7, **cfg.layout_dims)
    try:
        gpt = build_gpt_model(cfg, parallel)  # the same seed: the same initial weights for every fraction
        before = {k: v.float().cpu().numpy() for k, v in full_state_dict(gpt).items()}
        trainable = make_trainable(gpt, cfg, parallel, OptimConfig(lr=LR, schedule="constant"), STEPS)
        tokens = torch.randint(0, VOCAB, (B, S + 1), generator=torch.Generator().manual_seed(0)).cuda()
        inputs, labels, mask = shift_for_next_token(tokens, torch.ones_like(tokens, dtype=torch.float))

        def loss_fn(logits, micro):
            return masked_token_nll_sum(token_logprobs(logits, micro["labels"]), micro["loss_mask"]), {}

        for _ in range(STEPS):
            trainable.zero_grad()
            run_forward_backward(trainable.model, {"tokens": inputs, "labels": labels, "loss_mask": mask},
                                 loss_fn=loss_fn, normalizer=float(mask.sum()), micro_batch_size=B)  # fmt: skip
            assert trainable.step()[0]
        states = [
            str(value.device)
            for opt in getattr(trainable.optimizer, "chained_optimizers", [trainable.optimizer])
            for state in opt.optimizer.state.values()
            for value in state.values()
            if torch.is_tensor(value) and value.dim() > 0
        ]
        return before, {k: v.float().cpu().numpy() for k, v in full_state_dict(trainable.model).items()}, states
    finally:
        shutdown()


def test_offloaded_steps_match_and_keep_the_adam_state_on_the_host() -> None:
    ((start, base, base_devices),) = run_ranks(_train, 1, 0.0, backend="nccl")
    assert base_devices and all(d.startswith("cuda") for d in base_devices)
    moved = max(abs(base[k] - start[k]).max() for k in base)  # Adam moves a weight by up to LR a step
    assert moved > 2 * LR, moved
    for fraction in (0.5, 1.0):
        ((same_start, after, devices),) = run_ranks(_train, 1, fraction, backend="nccl")
        assert all((same_start[k] == start[k]).all() for k in start)
        worst = max(abs(after[k] - base[k]).max() for k in base)
        # bf16 weights either way: rounding of the same fp32 update may differ by an ulp, far below
        # what a step that skipped or lost the offloaded share would leave
        assert worst < moved / 4, f"offload {fraction}: weights differ by {worst} (the steps moved {moved})"
        on_host = sum(d == "cpu" for d in devices) / len(devices)
        assert on_host > 0 and (fraction < 1 or on_host == 1), (fraction, devices)
