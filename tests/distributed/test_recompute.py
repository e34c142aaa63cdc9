"""Activation recompute (``parallel.recompute``): selective and full give the step that no
recompute gives (same loss, same weights after it), and keep fewer tensors for the backward."""

from __future__ import annotations

import pytest
import torch

from tests.multiprocess import run_ranks

VOCAB, B, S = 64, 4, 127


def _step(rank: int, world: int, recompute: str, initial: dict | None):
    """One SFT step with ``recompute``: (loss, bytes saved for the backward, full weights after)."""
    from carft_nemo.algorithms.sft import masked_token_nll_sum, shift_for_next_token
    from carft_nemo.distributed.layout import ParallelConfig, initialize, shutdown
    from carft_nemo.models.config import ModelConfig
    from carft_nemo.models.forward import causal_inputs
    from carft_nemo.models.gpt import build_gpt_model
    from carft_nemo.models.logprobs import token_logprobs
    from carft_nemo.models.sharding import full_state_dict, load_full_state_dict
    from carft_nemo.training.forward_backward import run_forward_backward
    from carft_nemo.training.optim import OptimConfig, make_trainable

    cfg = ModelConfig(preset="micro", vocab_size=VOCAB)
    parallel = ParallelConfig(recompute=recompute)
    initialize(parallel, seed=7, **cfg.layout_dims)
    try:
        model = build_gpt_model(cfg, parallel)
        if initial is not None:
            load_full_state_dict(model, {k: torch.from_numpy(v) for k, v in initial.items()})
        start = {k: v.numpy() for k, v in full_state_dict(model).items()}
        trainable = make_trainable(model, cfg, parallel, OptimConfig(lr=1e-3, schedule="constant"), 10)
        tokens = torch.randint(0, VOCAB, (B, S + 1), generator=torch.Generator().manual_seed(0))
        inputs, labels, mask = shift_for_next_token(tokens, torch.ones_like(tokens, dtype=torch.float))
        params = {p.untyped_storage().data_ptr() for p in trainable.model.parameters()}
        saved: dict[int, int] = {}

        def keep(t):
            if t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        # what the forward keeps for the backward (the backward's recomputation would count again)
        positions, causal = causal_inputs(inputs)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            logits = trainable.model(inputs, positions, causal)
            masked_token_nll_sum(token_logprobs(logits, labels), mask)
        del logits

        def loss_fn(logits, micro):
            return masked_token_nll_sum(token_logprobs(logits, micro["labels"]), micro["loss_mask"]), {}

        trainable.zero_grad()
        metrics = run_forward_backward(trainable.model, {"tokens": inputs, "labels": labels, "loss_mask": mask},
                                       loss_fn=loss_fn, normalizer=float(mask.sum()), micro_batch_size=B)  # fmt: skip
        trainable.step()
        after = {k: v.numpy() for k, v in full_state_dict(trainable.model).items()}
        return metrics["loss"], sum(saved.values()), start, after
    finally:
        shutdown()


def test_recompute_gives_the_same_step_and_keeps_less():
    ((loss, kept, initial, after),) = run_ranks(_step, 1, "none", None)
    kept_by = {}
    for setting in ("selective", "full"):
        ((r_loss, r_kept, _, r_after),) = run_ranks(_step, 1, setting, initial)
        assert r_loss == pytest.approx(loss, rel=1e-6), setting
        assert max(abs(r_after[k] - after[k]).max() for k in after) < 1e-6, setting
        kept_by[setting] = r_kept
    assert kept_by["full"] < kept_by["selective"] < kept
