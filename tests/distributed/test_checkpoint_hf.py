"""HF <-> megatron conversion at TP=1, TP=2 and PP=2 (2 gloo processes on 127.0.0.1)."""

from __future__ import annotations

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


CASES = {"llama": False, "qwen2": True}  # family -> tied embeddings (qwen2 also has QKV bias)


def _import_and_export(rank: int, world: int, root: str, tokens: torch.Tensor):
    """Both families, every layout, in one spawn (spawning and importing megatron dominate)."""
    return {family: _one_family(Path(root) / family, tokens) for family in CASES}


def _one_family(root: Path, tokens: torch.Tensor):
    from carft_nemo.checkpoint.hf_io import export_hf, import_hf
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
        export_hf(model, cfg, Path(out_root) / f"tp{tp}pp{pp}")
    return results


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hf_roundtrip")
    for family, tied in CASES.items():
        make_tiny_hf(root / family / "hf", family, tied=tied)
    tokens = torch.randint(0, 100, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    return root, tokens, run_ranks(_import_and_export, 2, str(root), tokens)


@pytest.mark.parametrize("family", list(CASES))
def test_hf_roundtrip_any_layout(converted, family: str) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    root, tokens, results = converted
    tied, hf_dir = CASES[family], root / family / "hf"
    reference = hf_logits(hf_dir, tokens)
    per_rank = [r[family] for r in results]

    original = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).state_dict()
    for layout in LAYOUTS:
        got = [r[layout] for r in per_rank if r[layout] is not None]
        assert got, f"no rank returned logits for {layout}"
        for logits in got:
            err = (logits - reference).abs().max().item()
            assert err < 1e-4, f"{family} {layout}: logits differ from transformers by {err:.2e}"
        out = root / family / "out" / f"tp{layout[0]}pp{layout[1]}"
        written = load_file(str(out / "model.safetensors"))
        assert ("lm_head.weight" in written) == (not tied)
        exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        assert type(exported).__name__ == ("Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM")
        state = exported.state_dict()
        assert state.keys() == original.keys()
        for name, tensor in original.items():
            assert torch.equal(state[name], tensor), f"{layout}: exported {name} differs from the original"
        with torch.no_grad():
            assert torch.equal(exported(tokens).logits, reference)
