"""Sequence sharding: pooling over 2 shards of ``s`` == unsharded pooling, values and gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist

from carft_nemo.algorithms.contrastive import (
    ContrastiveConfig,
    CoTBatch,
    contrastive_loss,
    lcs_spans,
    pool_cot_embedding,
)
from tests.distributed.test_contrastive_dp import F64, make_case, to_numpy, to_torch
from tests.multiprocess import run_ranks


def _pool_case(seed: int = 1, s: int = 8, b: int = 3, d: int = 4):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(s, b, d, dtype=F64, generator=g)
    values = 5 * torch.randn(s, b, dtype=F64, generator=g)
    mask = torch.rand(s, b, generator=g) > 0.3
    mask[:, 2] = False
    mask[1, 2] = True  # sample 2: its only CoT token lives on the first shard
    weights = torch.randn(b, d, dtype=F64, generator=g)  # fixed readout: L = sum(weights * z)
    return emb, values, mask, weights


def pooled_and_grads(emb, values, mask, weights, rows: slice, group) -> dict[str, torch.Tensor]:
    emb = emb[rows].clone().requires_grad_(True)
    values = values[rows].clone().requires_grad_(True)
    pooled = pool_cot_embedding(emb, values, mask[rows], seq_group=group)
    (weights * pooled.z).sum().backward()
    return {"z": pooled.z.detach(), "nonempty": pooled.nonempty, "emb": emb.grad, "values": values.grad}


def _shard_loss(case: dict, rows: slice, group) -> dict[str, torch.Tensor]:
    """The full contrastive loss with ``s`` sharded: slice every [s, b] input along s.

    LCS spans are computed on the full sequences and then sliced, as the data pipeline would.
    """
    sharded = {
        k: (v[rows] if k in ("hidden_gen", "hidden_ann", "mask_gen", "mask_ann") else v) for k, v in case.items()
    }
    spans = lcs_spans(case["ids_ann"], case["mask_ann"], case["ids_gen"], case["mask_gen"])
    sharded["spans"] = type(spans)(spans.annotated_common[rows], spans.on_policy_common[rows], spans.length)
    return _loss_with_spans(sharded, group)


def _loss_with_spans(case: dict, group) -> dict[str, torch.Tensor]:
    proj = case["proj"].clone().requires_grad_(True)
    value = case["value"].clone().requires_grad_(True)
    cot = lambda h, m: CoTBatch(h @ proj.t(), h @ value, m)  # noqa: E731
    loss, _ = contrastive_loss(
        ContrastiveConfig(variant="v9", coef=1.0, detach_annotated=False),
        cot(case["hidden_gen"], case["mask_gen"]),
        cot(case["hidden_ann"], case["mask_ann"]),
        case["correct"],
        case["spans"],
        seq_group=group,
    )
    loss.backward()
    return {"loss": loss.detach(), "proj": proj.grad, "value": value.grad}


def _rank_fn(rank: int, world: int, pool_case, loss_case) -> dict[str, dict]:
    s = pool_case[0].shape[0]
    rows = slice(rank * s // world, (rank + 1) * s // world)
    s_loss = loss_case["hidden_gen"].shape[0]
    loss_rows = slice(rank * s_loss // world, (rank + 1) * s_loss // world)
    return to_numpy(
        {
            "pool": pooled_and_grads(*pool_case, rows, dist.group.WORLD),
            "loss": _shard_loss(loss_case, loss_rows, dist.group.WORLD),
        }
    )


def test_two_sequence_shards_equal_unsharded():
    pool_case = _pool_case()
    loss_case = make_case(s=8)
    results = [to_torch(r) for r in run_ranks(_rank_fn, 2, pool_case, loss_case)]

    full = pooled_and_grads(*pool_case, slice(None), None)
    assert full["nonempty"].tolist() == [True, True, True]
    half = pool_case[0].shape[0] // 2
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["pool"]["z"], full["z"])
        assert torch.equal(res["pool"]["nonempty"], full["nonempty"])
        rows = slice(rank * half, (rank + 1) * half)
        torch.testing.assert_close(res["pool"]["emb"], full["emb"][rows])
        torch.testing.assert_close(res["pool"]["values"], full["values"][rows])

    full_loss = _shard_loss(loss_case, slice(None), None)
    for res in results:
        torch.testing.assert_close(res["loss"]["loss"], full_loss["loss"])
    # Each shard's parameter gradient is partial: their sum (megatron's TP/CP reduction) is exact.
    for param in ("proj", "value"):
        torch.testing.assert_close(results[0]["loss"][param] + results[1]["loss"][param], full_loss[param])
