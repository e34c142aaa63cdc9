"""Data parallel: 2 gloo ranks with parts of the batch == 1 process with the whole batch.

The shared "model" is a projection W and a value vector w (e = W h, V = w . h) applied to
fixed hidden states, so the check covers what training needs: the loss (mean over ranks of
each rank's share, and the logged global value) and the parameter gradients averaged
over ranks as megatron / DDP do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from carft_nemo.algorithms.contrastive import ContrastiveConfig, CoTBatch, contrastive_loss, lcs_spans
from tests.multiprocess import run_ranks

F64 = torch.float64
CONFIGS = {
    "v9_grad_gather": dict(variant="v9", coef=1.0, detach_annotated=False, gather_with_grad=True),
    "v9_paper_gather": dict(variant="v9", coef=1.0),
    "v4_paper": dict(variant="v4", coef=1.0),
    "v4_clamped_low": dict(variant="v4", coef=1.0, clamp_positive_similarity=0.5),
}


def make_case(b: int = 6, s: int = 7, h: int = 5, d: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    case = {
        "hidden_gen": torch.randn(s, b, h, dtype=F64, generator=g),
        "hidden_ann": torch.randn(s, b, h, dtype=F64, generator=g),
        "mask_gen": torch.rand(s, b, generator=g) > 0.25,
        "mask_ann": torch.rand(s, b, generator=g) > 0.25,
        "ids_gen": torch.randint(0, 3, (s, b), generator=g),
        "ids_ann": torch.randint(0, 3, (s, b), generator=g),
        "correct": torch.tensor([True, False, True, False, False, True][:b]),
        "proj": torch.randn(d, h, dtype=F64, generator=g),
        "value": torch.randn(h, dtype=F64, generator=g),
    }
    case["mask_gen"][:, 3] = False  # one empty on-policy CoT: neither anchor nor candidate
    return case


def loss_and_grads(case: dict, rows: slice, cfg_kwargs: dict, dp_group) -> dict[str, torch.Tensor]:
    proj = case["proj"].clone().requires_grad_(True)
    value = case["value"].clone().requires_grad_(True)

    def cot(hidden, mask):
        hidden = hidden[:, rows]
        return CoTBatch(hidden @ proj.t(), hidden @ value, mask[:, rows])

    spans = lcs_spans(case["ids_ann"], case["mask_ann"], case["ids_gen"], case["mask_gen"])
    spans = type(spans)(spans.annotated_common[:, rows], spans.on_policy_common[:, rows], spans.length[rows])
    loss, metrics = contrastive_loss(
        ContrastiveConfig(**cfg_kwargs),
        cot(case["hidden_gen"], case["mask_gen"]),
        cot(case["hidden_ann"], case["mask_ann"]),
        case["correct"][rows],
        spans,
        dp_group=dp_group,
    )
    loss.backward()
    return {"loss": loss.detach(), "logged": metrics["contrastive/loss"], "proj": proj.grad, "value": value.grad}


def to_numpy(tree):
    """Tensors -> numpy arrays: torch's queue would share tensor memory that dies with the rank."""
    if isinstance(tree, dict):
        return {k: to_numpy(v) for k, v in tree.items()}
    return tree.detach().numpy()


def to_torch(tree):
    if isinstance(tree, dict):
        return {k: to_torch(v) for k, v in tree.items()}
    return torch.from_numpy(tree)


SPLITS = {"even": [(0, 3), (3, 6)], "uneven": [(0, 4), (4, 6)]}


def _rank_fn(rank: int, world: int, case: dict) -> dict[str, dict]:
    return to_numpy(
        {
            f"{split}/{name}": loss_and_grads(case, slice(*rows[rank]), kw, dist.group.WORLD)
            for split, rows in SPLITS.items()
            for name, kw in CONFIGS.items()
        }
    )


def test_two_ranks_equal_one_process():
    """Even (3 + 3) and uneven (4 + 2) splits of 6 samples, three configurations."""
    case = make_case()
    results = [to_torch(r) for r in run_ranks(_rank_fn, 2, case)]
    for key in results[0]:
        name = key.split("/")[1]
        full = loss_and_grads(case, slice(None), CONFIGS[name], None)
        assert full["loss"].item() > 0
        ranks = [r[key] for r in results]
        torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, full["loss"])
        for r in ranks:
            torch.testing.assert_close(r["logged"], full["logged"])
        for param in ("proj", "value"):
            averaged = (ranks[0][param] + ranks[1][param]) / 2
            torch.testing.assert_close(averaged, full[param], msg=f"{key}: {param} gradient")


# ---------------------------------------------------------------------------- v4's detached gather


def _v4_rows(case: dict, rows: slice, dp_group) -> dict[str, torch.Tensor]:
    """v4 on one-token CoTs (z = the token's vector): loss and the gradient of this rank's rows."""
    z_gen = case["z_gen"][rows].clone().requires_grad_(True)
    ones = torch.ones(1, z_gen.shape[0], dtype=torch.bool)
    zeros = torch.zeros(1, z_gen.shape[0], dtype=F64)
    loss, _ = contrastive_loss(
        ContrastiveConfig(variant="v4", coef=1.0),
        CoTBatch(z_gen[None], zeros, ones),
        CoTBatch(case["z_ann"][rows][None], zeros, ones),
        case["correct"][rows],
        dp_group=dp_group,
    )
    loss.backward()
    return {"loss": loss.detach(), "grad": z_gen.grad}


def _v4_rank_fn(rank: int, world: int, case: dict) -> dict:
    return to_numpy(_v4_rows(case, slice(3 * rank, 3 * rank + 3), dist.group.WORLD))


def test_v4_detached_gather_equals_one_process_and_sends_nothing_across_ranks():
    g = torch.Generator().manual_seed(7)
    case = {
        "z_gen": torch.randn(6, 4, dtype=F64, generator=g),
        "z_ann": torch.randn(6, 4, dtype=F64, generator=g),
        "correct": torch.tensor([True, True, False, True, False, True]),
    }
    ranks = [to_torch(r) for r in run_ranks(_v4_rank_fn, 2, case)]
    full = _v4_rows(case, slice(None), None)
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, full["loss"])
    # each rank's gradient is its own rows' numerator pull only: (W / N) d(-min(cos, 0.9) / tau) / dz
    z = case["z_gen"].clone().requires_grad_(True)
    cos = torch.nn.functional.cosine_similarity(case["z_ann"], z, dim=-1).clamp(max=0.9)
    (-(cos / 0.2)[case["correct"]].sum() / int(case["correct"].sum())).backward()
    for rank, rows in enumerate((slice(0, 3), slice(3, 6))):
        torch.testing.assert_close(ranks[rank]["grad"], 2 * z.grad[rows])  # W = 2 ranks
    torch.testing.assert_close(full["grad"], z.grad)
