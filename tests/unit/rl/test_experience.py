"""Controller-side tensor plumbing: DP sharding, replica maps, rollout joins, the LCS split."""

import pytest
import torch

from carft_nemo.data.tokenization import EncodedExample
from carft_nemo.distributed.layout import ParallelLayout
from carft_nemo.generation.rollout import Rollout
from carft_nemo.rl.experience import AnnotatedBatch, action_mask, join_rollouts, lcs_split
from carft_nemo.workers.model_worker import ReplicaMap, concat_rows, shard_rows


def test_shard_rows_round_trip_and_errors():
    batch = {"a": torch.arange(12).view(6, 2), "b": torch.arange(6)}
    shards = shard_rows(batch, 3)
    assert [s["b"].tolist() for s in shards] == [[0, 1], [2, 3], [4, 5]]
    joined = concat_rows(shards)
    assert torch.equal(joined["a"], batch["a"]) and torch.equal(joined["b"], batch["b"])
    with pytest.raises(ValueError, match="6 rows cannot be split evenly over 4"):
        shard_rows(batch, 4)
    with pytest.raises(ValueError, match="disagree"):
        shard_rows({"a": torch.zeros(2), "b": torch.zeros(3)}, 1)


def _layout(rank, tp, pp, dp, tp_rank, pp_rank, dp_rank):
    return ParallelLayout(
        rank=rank,
        world_size=tp * pp * dp,
        tensor_parallel=tp,
        pipeline_parallel=pp,
        context_parallel=1,
        data_parallel=dp,
        tp_rank=tp_rank,
        pp_rank=pp_rank,
        dp_rank=dp_rank,
    )


def test_replica_map_picks_last_stage_tp0_per_replica():
    # 8 ranks: TP=2, PP=2, DP=2 in megatron's order tp fastest, then dp, then pp
    layouts = []
    for rank in range(8):
        tp_rank, dp_rank, pp_rank = rank % 2, (rank // 2) % 2, rank // 4
        layouts.append(_layout(rank, 2, 2, 2, tp_rank, pp_rank, dp_rank))
    rmap = ReplicaMap.from_layouts(layouts)
    assert rmap.answering == (4, 6)
    assert rmap.per_rank(["x", "y"]) == ["x", "x", "y", "y", "x", "x", "y", "y"]
    assert rmap.answers(list(range(8))) == [4, 6]
    with pytest.raises(ValueError, match="3 shards for 2"):
        rmap.per_rank([1, 2, 3])


def test_join_rollouts_keeps_replica_order_and_action_mask_alignment():
    a = Rollout(prompts=[[1, 2]], responses=[[5, 6, 7]], logprobs=[[-1.0, -2.0, -3.0]], finished=[True])
    b = Rollout(prompts=[[3]], responses=[[8]], logprobs=[[-0.5]], finished=[False])
    joined = join_rollouts([a, b])
    batch = joined.to_batch(pad_token_id=0)
    assert batch.tokens.tolist() == [[1, 2, 5, 6, 7], [3, 8, 0, 0, 0]]
    # action column j is token j+1: row 0 responds at tokens 2..4 -> columns 1..3
    assert action_mask(batch).tolist() == [[False, True, True, True], [True, False, False, False]]
    assert joined.finished == [True, False]


def test_lcs_split_marks_common_cot_tokens_only():
    # annotated: prompt [1, 2], CoT [7, 8, 9]; on-policy: prompt [1, 2], response [7, 4, 9]
    annotated = AnnotatedBatch.build([EncodedExample("q", [1, 2, 7, 8, 9], [0, 0, 1, 1, 1], 2)], pad_id=0)
    rollout = Rollout(prompts=[[1, 2]], responses=[[7, 4, 9]], logprobs=[[0.0] * 3], finished=[True]).to_batch(0)
    split = lcs_split(annotated, rollout)
    assert split["lcs_length"].tolist() == [2]
    assert split["ann_common"].tolist() == [[False, False, True, False, True]]
    assert split["gen_common"].tolist() == [[False, False, True, False, True]]
