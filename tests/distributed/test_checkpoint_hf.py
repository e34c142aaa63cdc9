"""HF <-> megatron conversion at TP=1, TP=2 and PP=2 (2 gloo processes on 127.0.0.1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed._checkpoint_helpers import (
    BATCH,
    SEQ,
    hf_logits,
    make_tiny_hf,
    megatron_logits,
    tiny_model_config,
)
from tests.multiprocess import run_ranks

LAYOUTS = ((1, 1), (2, 1), (1, 2))  # (tp, pp) on 2 processes; TP=1 PP=1 runs data-parallel


# name -> the tiny model's family (qwen2 has QKV bias), tied embeddings and head shape: the 7B
# shapes (4 heads over 2 key/value heads), Qwen2.5-32B's (40 / 8: 5 to 1, untied, rope 1e6) and
# Qwen2.5-72B's and CodeLlama-34B's (64 / 8: 8 to 1, untied, rope 1e6)
CASES = {
    "llama": {"family": "llama", "tied": False},
    "qwen2": {"family": "qwen2", "tied": True},
    "qwen2_32b_shape": {"family": "qwen2", "tied": False, "heads": 10, "kv_heads": 2, "head_dim": 8, "rope_theta": 1e6},
    "qwen2_72b_shape": {"family": "qwen2", "tied": False, "heads": 16, "kv_heads": 2, "head_dim": 8, "rope_theta": 1e6},
    "codellama_34b_shape": {"family": "llama", "tied": False, "heads": 16, "kv_heads": 2, "head_dim": 8,
                            "rope_theta": 1e6},
}  # fmt: skip


def _import_and_export(rank: int, world: int, root: str, tokens: torch.Tensor):
    """Every case, every layout, in one spawn (spawning and importing megatron dominate)."""
    return {name: _one_family(Path(root) / name, tokens) for name in CASES}


def _one_family(root: Path, tokens: torch.Tensor):
    from carft_nemo.checkpoint.hf_conversion import megatron_to_hf
    from carft_nemo.checkpoint.hf_io import LazySafetensors, export_hf, gather_full_state_dict, import_hf
    from carft_nemo.distributed.layout import ParallelConfig, initialize
    from carft_nemo.models.gpt import build_gpt_model

    hf_dir, out_root = root / "hf", root / "out"
    cfg = tiny_model_config(hf_dir)
    results = {}
    for tp, pp in LAYOUTS:
        parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
        initialize(parallel, seed=100 + tp * 10 + pp)  # a different random init per layout
        model = build_gpt_model(cfg, parallel)
        import_hf(model, hf_dir, cfg)
        logits = megatron_logits(model, tokens)
        results[(tp, pp)] = None if logits is None else logits[..., : cfg.vocab_size].clone()
        out = export_hf(model, cfg, Path(out_root) / f"tp{tp}pp{pp}")
        # the streamed export writes what gathering the whole model on rank 0 and converting it gives
        gathered = gather_full_state_dict(model, cfg)
        if gathered is not None:
            expected, written = megatron_to_hf(gathered, cfg), LazySafetensors(out)
            same = set(written) == set(expected) and all(torch.equal(written[k], v) for k, v in expected.items())
            results[("streamed_equals_gathered", tp, pp)] = same
    return results


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hf_roundtrip")
    for name, case in CASES.items():
        make_tiny_hf(root / name / "hf", **case)
    tokens = torch.randint(0, 100, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    return root, tokens, run_ranks(_import_and_export, 2, str(root), tokens)


@pytest.mark.parametrize("name", list(CASES))
def test_hf_roundtrip_any_layout(converted, name: str) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    root, tokens, results = converted
    family, tied, hf_dir = CASES[name]["family"], CASES[name]["tied"], root / name / "hf"
    reference = hf_logits(hf_dir, tokens)
    per_rank = [r[name] for r in results]

    original = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).state_dict()
    for layout in LAYOUTS:
        got = [r[layout] for r in per_rank if r[layout] is not None]
        assert got, f"no rank returned logits for {layout}"
        for logits in got:
            err = (logits - reference).abs().max().item()
            assert err < 1e-4, f"{family} {layout}: logits differ from transformers by {err:.2e}"
        out = root / name / "out" / f"tp{layout[0]}pp{layout[1]}"
        assert [
            r[("streamed_equals_gathered", *layout)] for r in per_rank if ("streamed_equals_gathered", *layout) in r
        ] == [True]
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert ("lm_head.weight" in index) == (not tied)
        files = sorted(set(index.values()))
        assert len(files) == 2 + 2 + int(not tied)  # a file a piece: embedding, 2 layers, final norm, lm_head
        assert max(len(load_file(str(out / f))) for f in files) <= 12  # at most a layer's tensors in a file
        exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        assert type(exported).__name__ == ("Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM")
        state = exported.state_dict()
        assert state.keys() == original.keys()
        for key, tensor in original.items():
            assert torch.equal(state[key], tensor), f"{layout}: exported {key} differs from the original"
        with torch.no_grad():
            assert torch.equal(exported(tokens).logits, reference)
