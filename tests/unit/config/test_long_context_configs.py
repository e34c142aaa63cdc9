"""The long-context recipes (configs/long-context/): 16k and 32k sequences on Qwen2.5-7B-Instruct
with context parallelism, laid out for one node of 8 GPUs and inside the model's RoPE window."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from carft_nemo.config import ConfigError, load_config
from carft_nemo.models.config import ModelConfig
from carft_nemo.rl.config import RLConfig
from carft_nemo.rl.controller import check_layouts
from carft_nemo.schemas import schema_for
from carft_nemo.sft.config import SFTConfig, check_world_layout

ROOT = Path(__file__).resolve().parents[3]
FOLDER = ROOT / "configs" / "long-context"
RECIPES = sorted(FOLDER.glob("*.yaml"))
NAME = re.compile(r"^(sft|reft|carft)-qwen2\.5-7b-instruct-gsm8k-ncot-(16|32)k-(\d+)n(\d+)g-tp(\d+)cp(\d+)\.yaml$")


def test_sft_reft_and_carft_at_16k_and_32k():
    found = {(m[1], m[2]) for m in map(NAME.match, (p.name for p in RECIPES)) if m}
    assert found == {(method, k) for method in ("sft", "reft", "carft") for k in ("16", "32")}
    assert all(NAME.match(p.name) for p in RECIPES), [p.name for p in RECIPES]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_a_long_context_recipe_fits_its_nodes_and_the_model_window(path: Path):
    method, k, nodes, gpus, tp, cp = NAME.match(path.name).groups()
    cfg = load_config(schema_for(path), path)
    tokens, world = int(k) * 1024, int(nodes) * int(gpus)
    model = ModelConfig(preset="qwen2_5_7b").with_vocab(151665)
    assert model.rotary_base == 1e6 and model.max_sequence_length == 32768  # Qwen2.5-7B-Instruct's config.json
    if isinstance(cfg, SFTConfig):
        parallel, longest = cfg.parallel, cfg.encoding.max_total_tokens
        dp = check_world_layout(cfg, world)
    else:
        assert isinstance(cfg, RLConfig) and cfg.method == method
        parallel, longest = cfg.actor.parallel, cfg.longest_sequence
        assert cfg.actor.num_workers == world and not cfg.uses_critic_group and not cfg.uses_reference_group
        dp = check_layouts(cfg, model)["actor"]
        assert cfg.rl.rollout_size % (dp * parallel.context_parallel) == 0  # generation replicas
    assert (parallel.tensor_parallel, parallel.context_parallel) == (int(tp), int(cp))
    assert dp * int(tp) * int(cp) == world
    assert longest == tokens <= cfg.model.max_sequence_length
    assert longest % parallel.sequence_multiple == 0  # whole chunks on every rank
    assert not cfg.model.is_unset and cfg.model.rotary_base == 1e6


def test_a_sequence_past_the_model_window_is_refused_by_its_key():
    path = FOLDER / "sft-qwen2.5-7b-instruct-gsm8k-ncot-32k-1n8g-tp2cp4.yaml"
    with pytest.raises(ConfigError, match=r"model\.max_sequence_length: 32768 is below the longest .*40000 tokens"):
        load_config(SFTConfig, path, ["encoding.max_total_tokens=40000"])
    rl = FOLDER / "carft-qwen2.5-7b-instruct-gsm8k-ncot-32k-1n8g-tp2cp4.yaml"
    with pytest.raises(ConfigError, match=r"model\.max_sequence_length: 32768 .*generation\.max_new_tokens"):
        load_config(RLConfig, rl, ["generation.max_new_tokens=30000"])
    with pytest.raises(ConfigError, match=r"actor\.parallel\.context_parallel: 4 needs sequences of at least 8"):
        load_config(RLConfig, rl, ["encoding.max_total_tokens=6", "encoding.max_prompt_tokens=2",
                                   "generation.max_new_tokens=4"])  # fmt: skip
