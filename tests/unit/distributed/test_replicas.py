"""Rows over the replicas of a worker group and back (carft_nemo.distributed.replicas)."""

import pytest
import torch

from carft_nemo.distributed.layout import ParallelLayout
from carft_nemo.distributed.replicas import ReplicaMap, concat_rows, part_sizes, split_rows


def test_split_rows_round_trip_and_errors():
    batch = {"a": torch.arange(12).view(6, 2), "b": torch.arange(6)}
    shards = split_rows(batch, 3, even=True)
    assert [s["b"].tolist() for s in shards] == [[0, 1], [2, 3], [4, 5]]
    joined = concat_rows(shards)
    assert torch.equal(joined["a"], batch["a"]) and torch.equal(joined["b"], batch["b"])
    with pytest.raises(ValueError, match="6 rows cannot be split evenly over 4"):
        split_rows(batch, 4, even=True)
    with pytest.raises(ValueError, match="disagree"):
        split_rows({"a": torch.zeros(2), "b": torch.zeros(3)}, 1)


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


def test_uneven_split_gives_the_first_parts_one_more_and_keeps_order():
    assert part_sizes(16, 3) == [6, 5, 5]
    assert part_sizes(2, 4) == [1, 1, 0, 0]
    texts = [f"t{i}" for i in range(7)]
    parts = split_rows(texts, 3)
    assert parts == [["t0", "t1", "t2"], ["t3", "t4"], ["t5", "t6"]]
    assert concat_rows(parts) == texts
    with pytest.raises(ValueError, match="0 parts"):
        split_rows(texts, 0)


def test_independent_workers_each_answer_for_themselves():
    rmap = ReplicaMap.independent(3)
    assert rmap.per_rank(["a", "b", "c"]) == ["a", "b", "c"]
    assert rmap.answers([10, 11, 12]) == [10, 11, 12]


def test_context_parallel_ranks_are_generation_replicas_of_their_own():
    # 8 ranks: TP=2, CP=2, DP=2 in megatron's order tp fastest, then cp, then dp
    layouts = []
    for rank in range(8):
        tp_rank, cp_rank, dp_rank = rank % 2, (rank // 2) % 2, rank // 4
        layout = _layout(rank, 2, 1, 2, tp_rank, 0, dp_rank)
        layouts.append(
            ParallelLayout(**{**vars(layout), "context_parallel": 2, "cp_rank": cp_rank, "generation_replica": -1})
        )
    training = ReplicaMap.from_layouts(layouts)
    generation = ReplicaMap.for_generation(layouts)
    assert training.data_parallel == 2 and training.per_rank("xy") == list("xxxxyyyy")
    assert generation.data_parallel == 4 and generation.answering == (0, 2, 4, 6)
    assert generation.per_rank("abcd") == list("aabbccdd")
    without_cp = [_layout(r, 1, 1, 2, 0, 0, r) for r in range(2)]
    assert ReplicaMap.for_generation(without_cp) == ReplicaMap.from_layouts(without_cp)
