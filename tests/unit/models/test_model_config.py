"""Model presets reproduce the published architectures; vocabulary padding follows megatron."""

from __future__ import annotations

import pytest

from carft_nemo.config import ConfigError
from carft_nemo.models.config import PRESETS, ModelConfig

# Parameter counts published with the checkpoints (HF safetensors index "total_size" / 2 bytes)
PUBLISHED = {"codellama_7b": 6_738_546_688, "qwen2_5_7b": 7_615_616_512}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_parameter_count_matches_published(preset: str) -> None:
    assert ModelConfig(preset=preset).num_parameters() == PUBLISHED[preset]


def test_family_specifics() -> None:
    qwen, llama = ModelConfig(preset="qwen2_5_7b"), ModelConfig(preset="codellama_7b")
    assert (qwen.family, qwen.qkv_bias, qwen.num_query_groups, qwen.head_dim) == ("qwen2", True, 4, 128)
    assert (llama.family, llama.qkv_bias, llama.num_query_groups, llama.rotary_base) == ("llama", False, 32, 1e6)


def test_yaml_style_override_keeps_preset_for_the_rest() -> None:
    cfg = ModelConfig(preset="micro", family="qwen2", qkv_bias=True, tie_word_embeddings=True, vocab_size=100)
    assert (cfg.num_layers, cfg.hidden_size, cfg.qkv_bias, cfg.tie_word_embeddings) == (2, 64, True, True)
    # tying drops one V x h matrix, QKV bias adds h + 2 kv per layer
    untied = ModelConfig(preset="micro", family="qwen2", qkv_bias=True, vocab_size=100)
    assert untied.num_parameters() - cfg.num_parameters() == 100 * 64


@pytest.mark.parametrize(
    "vocab, divisible, tp, expected",
    [(152064, 128, 1, 152064), (152064, 128, 8, 152576), (32016, 128, 2, 32256), (100, 8, 2, 112)],
)
def test_padded_vocab(vocab: int, divisible: int, tp: int, expected: int) -> None:
    cfg = ModelConfig(preset="micro", vocab_size=vocab, make_vocab_size_divisible_by=divisible)
    padded = cfg.padded_vocab_size(tp)
    assert padded == expected and padded % (divisible * tp) == 0 and padded >= vocab


def test_vocab_must_be_known_before_building() -> None:
    with pytest.raises(ConfigError, match=r"model\.vocab_size: unknown"):
        ModelConfig(preset="tiny").padded_vocab_size(1)
    assert ModelConfig(preset="tiny").with_vocab(512).padded_vocab_size(2) == 512


def test_every_preset_is_valid_and_complete() -> None:
    for name in PRESETS:
        cfg = ModelConfig(preset=name)
        assert cfg.hidden_size % cfg.num_attention_heads == 0 and cfg.num_attention_heads % cfg.num_query_groups == 0
