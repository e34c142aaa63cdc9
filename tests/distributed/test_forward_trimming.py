"""Forward passes that stop each micro-batch at its longest row give the untrimmed outputs."""

from __future__ import annotations

import torch

from carft_nemo.workers.model_worker import trim_microbatches
from tests.multiprocess import run_ranks

VOCAB, B, S = 64, 6, 20


def test_trim_microbatches_cuts_to_the_longest_row_rounded_up():
    tokens = torch.arange(4 * 10).view(4, 10)
    micro = [
        {"tokens": tokens[:2], "lengths": torch.tensor([3, 5]), "other": torch.ones(2)},
        {"tokens": tokens[2:], "lengths": torch.tensor([9, 2])},
    ]
    cut = trim_microbatches(micro)
    assert [m["tokens"].shape[1] for m in cut] == [5, 9]
    assert torch.equal(cut[0]["tokens"], tokens[:2, :5]) and torch.equal(cut[0]["other"], torch.ones(2))
    assert all("lengths" not in m for m in cut)
    assert [m["tokens"].shape[1] for m in trim_microbatches(micro, multiple=4)] == [8, 10]
    assert [m["tokens"].shape[1] for m in trim_microbatches(micro, same_width=True)] == [9, 9]


def test_sequence_multiple_follows_sequence_and_context_parallel():
    from carft_nemo.distributed.layout import ParallelConfig

    assert ParallelConfig(tensor_parallel=4).sequence_multiple == 1
    assert ParallelConfig(tensor_parallel=4, sequence_parallel=True).sequence_multiple == 4
    assert (
        ParallelConfig(tensor_parallel=4, sequence_parallel=True, context_parallel=3).sequence_multiple == 12
    )  # lcm(4, 6)
    assert ParallelConfig(context_parallel=2).sequence_multiple == 4


def _outputs(rank: int, world: int) -> tuple[dict, dict, list[int]]:
    from carft_nemo.distributed.layout import ParallelConfig, initialize, shutdown
    from carft_nemo.models.config import ModelConfig
    from carft_nemo.models.forward import unwrap
    from carft_nemo.models.gpt import build_gpt_model
    from carft_nemo.models.heads import attach_policy_heads
    from carft_nemo.workers.actor_loss import policy_outputs
    from carft_nemo.workers.model_worker import ModelWorker, on_token_positions

    model_cfg = ModelConfig(preset="micro", vocab_size=VOCAB)
    initialize(
        ParallelConfig(),
        seed=1234,
        num_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
    )
    try:
        worker = ModelWorker()
        worker.model = build_gpt_model(model_cfg, ParallelConfig())
        attach_policy_heads(unwrap(worker.model), shared_value_head=True, contrastive_dim=8)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, VOCAB, (B, S), generator=g)
        lengths = torch.tensor([4, 7, 20, 11, 3, 5])
        fn = policy_outputs(unwrap(worker.model), ("logprobs", "values", "embeddings"), 1.0, VOCAB)
        rows = on_token_positions({"tokens": tokens})  # the next-token targets the log-probs score
        full = worker.collect_forward(rows, fn, 2, hidden_to_loss=True)
        trimmed = worker.collect_forward({**rows, "lengths": lengths}, fn, 2, hidden_to_loss=True)
        as_numpy = lambda out: {k: v.numpy() for k, v in out.items()}  # noqa: E731 (tensors would not outlive the rank)
        return as_numpy(full), as_numpy(trimmed), lengths.tolist()
    finally:
        shutdown()


def test_trimmed_forward_matches_the_full_width_one():
    ((full, trimmed, lengths),) = run_ranks(_outputs, 1)
    full = {k: torch.from_numpy(v) for k, v in full.items()}
    trimmed = {k: torch.from_numpy(v) for k, v in trimmed.items()}
    assert set(full) == set(trimmed) == {"logprobs", "values", "embeddings"}
    for row, length in enumerate(lengths):
        for key in full:
            real = length - 1 if key == "logprobs" else length
            assert full[key].shape == trimmed[key].shape, key
            torch.testing.assert_close(trimmed[key][row, :real], full[key][row, :real], atol=1e-5, rtol=1e-5)
    # rows sorted by length form micro-batches [20, 11], [7, 5], [4, 3]: the last one stops at 4
    shortest = lengths.index(3)
    assert not trimmed["embeddings"][shortest, 4:].any() and full["embeddings"][shortest, 4:].any()
