"""Every YAML in configs/ loads against its schema, and the paper-scale layouts fit 8 GPUs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from carft_nemo.config import ConfigError, load_config
from carft_nemo.schemas import schema_for
from carft_nemo.sft.run import SFTConfig, check_world_layout

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "base" not in p.parts)


def test_there_are_configs() -> None:
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_loads_and_validates(path: Path) -> None:
    cfg = load_config(schema_for(path), path)
    if isinstance(cfg, SFTConfig):
        nodes_gpus = re.search(r"-(\d+)n(\d+)g-", path.name)
        gpus = int(nodes_gpus[1]) * int(nodes_gpus[2]) if nodes_gpus else 1
        assert check_world_layout(cfg, gpus) >= 1
        assert not cfg.model.is_unset


def test_paper_sft_configs_carry_the_paper_settings() -> None:
    for path in (ROOT / "configs").glob("sft-*-1n8g-*.yaml"):
        cfg = load_config(SFTConfig, path)
        assert cfg.optim.lr == pytest.approx(1e-5), path
        assert cfg.train.global_batch_size == 64, path
        assert cfg.encoding.max_total_tokens == 1024, path
        assert cfg.model.bf16 and cfg.init_from_hf and cfg.tokenizer.path, path
        assert cfg.model.num_layers in (28, 32), path


def test_layout_errors_name_the_key() -> None:
    cfg = load_config(
        SFTConfig, ROOT / "configs" / "sft-codellama-7b-gsm8k-ncot-1n8g-tp2.yaml", ["parallel.tensor_parallel=3"]
    )
    with pytest.raises(ConfigError, match="parallel"):
        check_world_layout(cfg, 8)
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        check_world_layout(
            load_config(
                SFTConfig,
                ROOT / "configs" / "sft-tiny-synthetic.yaml",
                ["train.global_batch_size=24", "train.micro_batch_size=16"],
            ),
            1,
        )


def test_unknown_config_kind_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="no schema"):
        schema_for(tmp_path / "ppo-typo.yaml")
