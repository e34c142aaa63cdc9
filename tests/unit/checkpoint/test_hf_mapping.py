"""HF <-> megatron tensor mapping, TP split rules and config checks (no process group)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from carft_nemo.checkpoint.hf_config import HFConversionError, check_compatible, model_config_from_hf, read_hf_config
from carft_nemo.checkpoint.hf_conversion import fuse_qkv, hf_to_megatron, megatron_to_hf, split_qkv
from carft_nemo.checkpoint.tp_shard import shard, split_rule
from carft_nemo.models.config import ModelConfig

CFG = ModelConfig(
    family="qwen2",
    num_layers=2,
    hidden_size=32,
    ffn_hidden_size=48,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=50,
    max_sequence_length=64,
    rotary_base=1e4,
    norm_epsilon=1e-6,
    qkv_bias=True,
    tie_word_embeddings=False,
)
HF = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 50,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e4,
    "tie_word_embeddings": False,
}


def _hf_state(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    shapes = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (cfg.vocab_size, h),
    }
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            }
        )
    return {k: torch.randn(*s, generator=g) for k, s in shapes.items()}


def test_fused_qkv_is_grouped_q_then_k_then_v() -> None:
    d, per_group = CFG.head_dim, CFG.num_attention_heads // CFG.num_query_groups
    # label every row by (kind, head): q heads 0..3, k/v heads 0..1
    q = torch.arange(CFG.num_attention_heads).repeat_interleave(d).float()[:, None] + 100
    k = torch.arange(CFG.num_query_groups).repeat_interleave(d).float()[:, None] + 200
    v = torch.arange(CFG.num_query_groups).repeat_interleave(d).float()[:, None] + 300
    fused = fuse_qkv(q, k, v, CFG)[:, 0]
    expected = []
    for g in range(CFG.num_query_groups):
        expected += [100 + g * per_group + j for j in range(per_group) for _ in range(d)]
        expected += [200 + g] * d + [300 + g] * d
    assert fused.tolist() == expected
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fuse_qkv(q, k, v, CFG), CFG), (q, k, v)))


def test_state_dict_round_trip_is_exact() -> None:
    hf = _hf_state(CFG)
    back = megatron_to_hf(hf_to_megatron(hf, CFG), CFG)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_swiglu_fc1_shard_keeps_gate_and_up_halves_together() -> None:
    gate, up = torch.arange(8.0)[:, None], torch.arange(100.0, 108.0)[:, None]
    full = torch.cat([gate, up])
    assert split_rule("decoder.layers.0.mlp.linear_fc1.weight") == (0, 2)
    for r in range(2):
        got = shard(full, "decoder.layers.0.mlp.linear_fc1.weight", r, 2, torch.Size([8, 1]))
        assert torch.equal(got, torch.cat([gate.chunk(2)[r], up.chunk(2)[r]]))


def test_vocab_rows_are_zero_padded_before_the_split() -> None:
    emb = torch.ones(50, 4)
    shard1 = shard(emb, "embedding.word_embeddings.weight", 1, 2, torch.Size([32, 4]))
    assert shard1.shape == (32, 4) and shard1[:18].eq(1).all() and shard1[18:].eq(0).all()
    assert split_rule("decoder.layers.3.self_attention.linear_proj.weight") == (1, 1)
    assert split_rule("decoder.layers.3.input_layernorm.weight") == (None, 1)


def test_config_from_hf_matches_and_mismatch_names_fields() -> None:
    assert model_config_from_hf(HF, make_vocab_size_divisible_by=128) == CFG
    other = model_config_from_hf({**HF, "vocab_size": 64, "hidden_size": 64})
    with pytest.raises(
        HFConversionError, match="model.hidden_size=32 but .* has 64.*model.vocab_size=50 but .* has 64"
    ):
        check_compatible(CFG, other, where="x/config.json")


@pytest.mark.parametrize(
    "change,match",
    [
        ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "MistralForCausalLM.*not supported"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 16}, "head_dim"),
    ],
)
def test_unsupported_hf_configs_are_refused(change: dict, match: str) -> None:
    with pytest.raises(HFConversionError, match=match):
        model_config_from_hf({**HF, **change})


def test_wrong_tensor_shape_and_missing_files_name_the_problem(tmp_path: Path) -> None:
    hf = _hf_state(CFG)
    hf["model.layers.1.mlp.up_proj.weight"] = torch.zeros(40, 32)
    with pytest.raises(HFConversionError, match=r"model.layers.1.mlp.up_proj.weight.*\(40, 32\)"):
        hf_to_megatron(hf, CFG)
    with pytest.raises(HFConversionError, match="config.json.*not found"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(HFConversionError, match="not valid JSON"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(HF))
    from carft_nemo.checkpoint.hf_io import LazySafetensors

    with pytest.raises(HFConversionError, match="no \\*.safetensors"):
        LazySafetensors(tmp_path)
