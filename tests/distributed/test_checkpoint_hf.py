"""HF <-> megatron conversion at TP=1, TP=2 and PP=2 (2 gloo processes on 127.0.0.1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed._checkpoint_helpers import (BATCH, SEQ, hf_logits, make_tiny_hf, megatron_logits,
                                                   tiny_model_config)
from tests.multiprocess import run_ranks

LAYOUTS = ((1, 1), (2, 1), (1, 2))  # (tp, pp) on 2 processes; TP=1 PP=1 runs data-parallel


def _import_and_export(rank: int, world: int, hf_dir: str, out_root: str, tokens: torch.Tensor):
    from carft_nemo.checkpoint.hf_io import export_hf, import_hf
    from carft_nemo.distributed.layout import ParallelConfig, initialize
    from carft_nemo.models.gpt import build_gpt_model

    cfg = tiny_model_config(Path(hf_dir))
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


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", True)])
def test_hf_roundtrip_any_layout(tmp_path: Path, family: str, tied: bool) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    hf_dir = make_tiny_hf(tmp_path / "hf", family, tied=tied)
    tokens = torch.randint(0, 100, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    reference = hf_logits(hf_dir, tokens)
    per_rank = run_ranks(_import_and_export, 2, str(hf_dir), str(tmp_path / "out"), tokens)

    original = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).state_dict()
    for layout in LAYOUTS:
        got = [r[layout] for r in per_rank if r[layout] is not None]
        assert got, f"no rank returned logits for {layout}"
        for logits in got:
            err = (logits - reference).abs().max().item()
            assert err < 1e-4, f"{family} {layout}: logits differ from transformers by {err:.2e}"
        out = tmp_path / "out" / f"tp{layout[0]}pp{layout[1]}"
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
