"""The 32B-72B recipes: CARFT, ReFT and Dr.GRPO (and their SFT) for Qwen2.5-32B/72B-Instruct and
CodeLlama-34B on GSM8K, laid out for their node counts and fitting 80 GB GPUs by the planner."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from carft_nemo.config import load_config
from carft_nemo.models.config import ModelConfig
from carft_nemo.planning.memory import GIB, Precision
from carft_nemo.planning.plan import plan_rl, plan_sft
from carft_nemo.rl.config import RLConfig
from carft_nemo.rl.controller import check_layouts
from carft_nemo.sft.config import SFTConfig, check_world_layout

ROOT = Path(__file__).resolve().parents[3]
# file-name model -> (preset, tokenizer size, layers, hidden, heads, key/value heads)
MODELS = {
    "qwen2.5-32b-instruct": ("qwen2_5_32b", 151665, 64, 5120, 40, 8),
    "qwen2.5-72b-instruct": ("qwen2_5_72b", 151665, 80, 8192, 64, 8),
    "codellama-34b": ("codellama_34b", 32000, 48, 8192, 64, 8),
}
NAME = re.compile(r"^(sft|carft|reft|grpo)-(.+)-gsm8k-ncot-(\d+)n8g-tp(\d+)(?:pp(\d+))?\.yaml$")
RECIPES = sorted(p for p in (ROOT / "configs").glob("*.yaml") if (m := NAME.match(p.name)) and m[2] in MODELS)


def test_every_method_and_model_has_a_recipe():
    found = {(NAME.match(p.name)[1], NAME.match(p.name)[2]) for p in RECIPES}
    assert found == {(method, model) for method in ("sft", "carft", "reft", "grpo") for model in MODELS}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_a_large_recipe_fits_its_nodes_and_80_gb(path: Path):
    method, name, nodes, tp, pp = NAME.match(path.name).groups()
    preset, vocab, layers, hidden, heads, groups = MODELS[name]
    world, tp, pp = int(nodes) * 8, int(tp), int(pp or 1)
    cfg = load_config(SFTConfig if method == "sft" else RLConfig, path)
    model = ModelConfig(preset=preset).with_vocab(vocab)
    assert (model.num_layers, model.hidden_size, model.num_attention_heads, model.num_query_groups) == (
        layers, hidden, heads, groups)  # fmt: skip
    if method == "sft":
        parallel = cfg.parallel
        assert check_world_layout(cfg, world) == world // (tp * pp)
        roles = plan_sft(cfg, model, Precision.gpu(model), world)
        assert cfg.optim.lr == pytest.approx(1e-5) and cfg.train.global_batch_size == 64
    else:
        assert cfg.method == method and cfg.model.num_layers == layers
        parallel = cfg.actor.parallel
        assert cfg.actor.num_workers == world
        assert cfg.actor.nodes == list(range(int(nodes)))  # ranks in node order: TP groups never straddle nodes
        assert check_layouts(cfg, model)["actor"] == world // (tp * pp)
        roles = plan_rl(cfg, model, Precision.gpu(model))
        assert cfg.actor.optim.lr == pytest.approx(3e-7)  # the paper code's RL learning rate
    assert (parallel.tensor_parallel, parallel.pipeline_parallel) == (tp, pp)
    assert parallel.use_distributed_optimizer
    peak = max(r.peak for r in roles) / GIB
    assert 30 < peak < 80, f"{path.name}: the planner's peak {peak:.1f} GiB"
