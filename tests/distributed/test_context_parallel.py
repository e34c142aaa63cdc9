"""Context parallelism on CPU (our attention core over all-gathered keys and values, gloo on
loopback): an SFT step at CP=2, at TP=2 x CP=2 and at CP=2 with packed rows equals the same
step at CP=1 on the same weights, in loss and in the weights after one optimizer step."""

from __future__ import annotations

import pytest
import torch

from carft_nemo.models.cp_attention import chunk_positions, split_for_context_parallel
from tests.multiprocess import run_ranks

VOCAB, B, S = 64, 4, 23  # inputs 23 wide: context parallelism pads them to a multiple of 2 x CP


def test_the_load_balanced_chunks_cover_the_sequence_once():
    t = torch.arange(2 * 12).view(2, 12)
    shares = [split_for_context_parallel(t, 3, r) for r in range(3)]
    assert shares[0][0].tolist() == [0, 1, 10, 11] and shares[2][0].tolist() == [4, 5, 6, 7]
    positions = torch.cat([chunk_positions(4, 3, r) for r in range(3)])
    assert sorted(positions.tolist()) == list(range(12))
    assert [chunk_positions(4, 3, r).tolist() for r in range(3)] == [s[0].tolist() for s in shares]
    with pytest.raises(ValueError, match="context_parallel=3"):
        split_for_context_parallel(torch.zeros(1, 10), 3, 0)


def _model(parallel, initial: dict | None):
    """The process group of ``parallel`` and a micro model on it, from the ``initial`` full weights if given."""
    from carft_nemo.distributed.layout import initialize
    from carft_nemo.models.config import ModelConfig
    from carft_nemo.models.gpt import build_gpt_model
    from carft_nemo.models.sharding import load_full_state_dict

    model_cfg = ModelConfig(preset="micro", vocab_size=VOCAB)
    heads = {"num_attention_heads": model_cfg.num_attention_heads, "num_query_groups": model_cfg.num_query_groups}
    initialize(parallel, seed=1234, num_layers=model_cfg.num_layers, **heads)
    model = build_gpt_model(model_cfg, parallel)
    if initial is not None:
        load_full_state_dict(model, {k: torch.from_numpy(v) for k, v in initial.items()})
    return model_cfg, model


def _sft_step(
    rank: int, world: int, tp: int, cp: int, initial: dict | None, reference: dict | None, packed: bool = False
):
    """One SFT step (the recipe's masked NLL sum) at TP=tp, CP=cp from the ``initial`` full weights
    (rows packed into bins if ``packed``).

    Without ``reference``: returns (loss, grad norm, initial full weights, full weights after).
    With it: returns (loss, grad norm, the largest difference of this rank's shard from the
    reference weights sharded for this layout).
    """
    from carft_nemo.algorithms.sft import masked_token_nll_sum, shift_for_next_token
    from carft_nemo.data.packing import PackingConfig
    from carft_nemo.distributed.layout import ParallelConfig, shutdown
    from carft_nemo.models.logprobs import token_logprobs
    from carft_nemo.models.sharding import full_state_dict, shard_state_dict_for_tp
    from carft_nemo.training.forward_backward import run_forward_backward
    from carft_nemo.training.optim import OptimConfig, make_trainable

    parallel = ParallelConfig(tensor_parallel=tp, context_parallel=cp)
    model_cfg, model = _model(parallel, initial)
    try:
        start = full_state_dict(model)
        trainable = make_trainable(model, model_cfg, parallel, OptimConfig(lr=1e-4, schedule="constant"), 10)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, VOCAB, (B, S + 1), generator=g)
        lengths = torch.tensor([S, S - 9, S - 4, S - 13])  # rows end early: packing has room
        loss_mask = (torch.rand(B, S + 1, generator=g) > 0.3).float() * (torch.arange(S + 1) < lengths[:, None])
        inputs, labels, mask = shift_for_next_token(tokens, loss_mask)

        def loss_fn(logits, micro):
            logp = token_logprobs(logits, micro["labels"], vocab_size=VOCAB)
            return masked_token_nll_sum(logp, micro["loss_mask"]), {"tokens": micro["loss_mask"].sum()}

        trainable.zero_grad()
        metrics = run_forward_backward(
            trainable.model,
            {"tokens": inputs, "labels": labels, "loss_mask": mask, "lengths": lengths},
            loss_fn=loss_fn,
            normalizer=float(mask.sum()),
            micro_batch_size=2,
            packing=PackingConfig(enabled=packed, max_tokens=24),
            sequence_multiple=parallel.sequence_multiple,
        )
        ok, grad_norm = trainable.step()
        assert ok
        after = full_state_dict(trainable.model)
        if reference is None:
            as_numpy = lambda sd: {k: v.numpy() for k, v in sd.items()}  # noqa: E731
            return metrics["loss"], metrics["tokens"], grad_norm, as_numpy(start), as_numpy(after)
        expected = shard_state_dict_for_tp({k: torch.from_numpy(v) for k, v in reference.items()}, trainable.model)
        worst = max(float((after[k] - expected[k]).abs().max()) for k in after)
        return metrics["loss"], metrics["tokens"], grad_norm, worst
    finally:
        shutdown()


@pytest.mark.parametrize(
    "tp,cp,packed", [(1, 2, False), (2, 2, False), (1, 2, True)], ids=["cp2", "tp2_cp2", "cp2_packed"]
)
def test_an_sft_step_with_context_parallelism_equals_cp1(tp, cp, packed):
    ((loss, tokens, grad_norm, initial, after),) = run_ranks(_sft_step, 1, 1, 1, None, None)
    results = run_ranks(_sft_step, tp * cp, tp, cp, initial, after, packed)
    for cp_loss, cp_tokens, cp_grad_norm, worst in results:
        assert cp_tokens == tokens  # every loss token counted once over the context-parallel ranks
        assert cp_loss == pytest.approx(loss, rel=1e-5)
        assert cp_grad_norm == pytest.approx(grad_norm, rel=1e-4)
        assert worst < 1e-5, worst


def _greedy(rank: int, world: int, cp: int, initial: dict | None):
    from carft_nemo.distributed.layout import ParallelConfig, shutdown
    from carft_nemo.generation import GenerationConfig, MegatronGenerator
    from carft_nemo.models.sharding import full_state_dict

    _, model = _model(ParallelConfig(context_parallel=cp), initial)
    try:
        prompts = [[3, 9, 4], [5, 1, 2, 8, 7], [11]]
        out = MegatronGenerator(model, vocab_size=VOCAB).generate(
            prompts, GenerationConfig(max_new_tokens=12, greedy=True)
        )
        return out.responses, {k: v.numpy() for k, v in full_state_dict(model).items()}
    finally:
        shutdown()


def test_a_context_parallel_model_generates_what_cp1_generates():
    """Every context-parallel rank holds the full weights and generates on its own (its RoPE table whole)."""
    ((responses, initial),) = run_ranks(_greedy, 1, 1, None)
    for cp_responses, _ in run_ranks(_greedy, 2, 2, initial):
        assert cp_responses == responses
