"""Worker groups on a real Ray instance: two actors form their own gloo group and run megatron
TP=2, matching TP=1; a pool of independent workers splits rows and answers in order.

One Ray cluster for the module (start-up costs seconds); the worker classes are plain
Impl classes, wrapped by the groups with ``ray.remote``.
"""

from __future__ import annotations

import pytest
import torch

from carft_nemo.config import ConfigError
from carft_nemo.distributed.layout import ParallelConfig
from carft_nemo.distributed.ray_group import ParallelWorker, RayWorkerGroup, WorkerGroup, start_local_ray

ray = pytest.importorskip("ray")
VOCAB, TEMPERATURE = 128, 0.7


class ForwardWorker(ParallelWorker):
    """Builds the micro model at the current layout and scores a fixed batch."""

    def __init__(self, vocab: int) -> None:
        from carft_nemo.models.config import ModelConfig

        self.model_cfg = ModelConfig(preset="micro", vocab_size=vocab)
        self.init_sd = None

    def logprobs(self, load_reference: bool) -> dict:
        from carft_nemo.models.forward import causal_inputs
        from carft_nemo.models.gpt import build_gpt_model
        from carft_nemo.models.logprobs import token_logprobs
        from carft_nemo.models.sharding import full_state_dict, load_full_state_dict

        parallel = ParallelConfig(tensor_parallel=self.layout.tensor_parallel)
        gpt = build_gpt_model(self.model_cfg, parallel)
        if load_reference:
            load_full_state_dict(gpt, self.init_sd)
        else:
            self.init_sd = full_state_dict(gpt)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, VOCAB, (2, 16), generator=gen)
        labels = torch.randint(0, VOCAB, (2, 16), generator=gen)
        with torch.no_grad():
            logits = gpt(tokens, *causal_inputs(tokens))
        return {
            "logprobs": token_logprobs(logits, labels, TEMPERATURE),
            "vocab_shard": logits.shape[-1],
            "pid": __import__("os").getpid(),
        }


@pytest.fixture(scope="module")
def ray_cluster():
    start_local_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_actors_form_group_and_tp2_matches_tp1(ray_cluster) -> None:
    dims = dict(num_layers=2, num_attention_heads=4, num_query_groups=2)
    group = RayWorkerGroup(ForwardWorker, 2, ParallelConfig(), model_dims=dims, worker_args=(VOCAB,))
    try:
        assert [(lay.rank, lay.data_parallel) for lay in group.layouts] == [(0, 2), (1, 2)]
        reference = group.run(ForwardWorker.logprobs, False)
        # same actors, same process group: rebuild megatron's state at TP=2
        layouts = group.run(ForwardWorker.init_parallel, ParallelConfig(tensor_parallel=2), None, 999, dims)
        assert [(lay.tp_rank, lay.data_parallel) for lay in layouts] == [(0, 1), (1, 1)]
        sharded = group.run(ForwardWorker.logprobs, True)
    finally:
        group.shutdown()
    assert len({r["pid"] for r in sharded}) == 2  # really two processes
    assert [r["vocab_shard"] for r in reference] == [VOCAB, VOCAB]
    assert [r["vocab_shard"] for r in sharded] == [VOCAB // 2, VOCAB // 2]
    for ref, out in zip(reference, sharded):
        diff = (out["logprobs"] - ref["logprobs"]).abs().max().item()
        assert diff < 1e-5, f"TP=2 log-probs differ from TP=1 by {diff:.3e}"
    assert reference[0]["logprobs"].std() > 0.01  # not a degenerate constant


def test_bad_layout_rejected_before_actors_start(ray_cluster) -> None:
    with pytest.raises(ConfigError, match=r"parallel\.tensor_parallel: 2 does not divide model\.num_query_groups=1"):
        RayWorkerGroup(
            ForwardWorker,
            2,
            ParallelConfig(tensor_parallel=2),
            model_dims=dict(num_layers=2, num_attention_heads=4, num_query_groups=1),
            worker_args=(VOCAB,),
        )


class EchoWorker:
    """A reward-pool-like worker: no process group, answers with its part of the rows."""

    def echo(self, texts: list[str], numbers: list[int], suffix: str) -> dict:
        return {"pid": __import__("os").getpid(), "rows": [f"{t}{n}{suffix}" for t, n in zip(texts, numbers)]}

    def process_id(self) -> int:
        return __import__("os").getpid()


def test_independent_pool_splits_rows_and_answers_in_order(ray_cluster) -> None:
    pool = WorkerGroup.independent(EchoWorker, 2)
    try:
        texts, numbers = [f"t{i}" for i in range(5)], list(range(5))
        answers = pool.answers(ray.get(pool.submit_rows(EchoWorker.echo, (texts, numbers), "!")))
        pids = pool.pids()
    finally:
        pool.kill()
    assert [a["rows"] for a in answers] == [["t00!", "t11!", "t22!"], ["t33!", "t44!"]]
    assert [a["pid"] for a in answers] == pids and len(set(pids)) == 2


def test_groups_take_methods_not_strings(ray_cluster) -> None:
    pool = WorkerGroup.independent(EchoWorker, 1)
    try:
        with pytest.raises(TypeError, match="expected a worker method"):
            pool.submit("echo", [], [], "")
        with pytest.raises(AttributeError, match="EchoWorker has no method 'logprobs'"):
            pool.submit(ForwardWorker.logprobs, True)
    finally:
        pool.kill()
