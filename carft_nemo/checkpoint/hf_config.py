"""Translate a Hugging Face ``config.json`` (Llama / Qwen2) to and from :class:`ModelConfig`.

Only the architectures our megatron model reproduces exactly are accepted: RMSNorm,
SwiGLU, rotate-half RoPE without scaling, GQA, optional QKV bias (Qwen2) and optional tied
embeddings. Anything else is refused with a message that names the field, because a
silently different architecture would only show up later as a bad loss.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from carft_nemo.config import ConfigError
from carft_nemo.models.config import ModelConfig

# HF architecture name -> our model family
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2"}


class HFConversionError(ConfigError):
    """An HF folder / config cannot be converted; the message names the file and field."""


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of an HF model folder."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise HFConversionError(f"{path}: not found (expected an HF model folder with config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise HFConversionError(f"{path}: not valid JSON: {err}") from None


def _rope_theta(cfg: Mapping[str, Any], where: str) -> float:
    # transformers 5 nests RoPE settings in ``rope_parameters``; 4.x has flat rope_theta/rope_scaling
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling")
    rope_type = rope.get("rope_type") or rope.get("type") or (scaling or {}).get("rope_type") or "default"
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) != "default"):
        raise HFConversionError(
            f"{where}: rope_type={rope_type!r} / rope_scaling={scaling!r} is not supported (only plain RoPE)"
        )
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return float(theta)


def model_config_from_hf(
    hf_config: Mapping[str, Any], *, where: str = "config.json", make_vocab_size_divisible_by: int = 128
) -> ModelConfig:
    """The :class:`ModelConfig` of an HF Llama/Qwen2 config dict; refuses unsupported variants."""
    archs = hf_config.get("architectures") or []
    model_type = hf_config.get("model_type")
    family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if family is None and not archs:
        family = _MODEL_TYPES.get(model_type)
    if family is None:
        raise HFConversionError(
            f"{where}: architectures={archs} (model_type={model_type!r}) is not supported; "
            f"supported: {sorted(ARCHITECTURES)}"
        )
    checks = {
        "hidden_act": (hf_config.get("hidden_act", "silu"), "silu"),
        "mlp_bias": (bool(hf_config.get("mlp_bias", False)), False),
        "use_sliding_window": (bool(hf_config.get("use_sliding_window", False)), False),
    }
    if family == "llama":
        checks["attention_bias"] = (bool(hf_config.get("attention_bias", False)), False)
    for field, (got, want) in checks.items():
        if got != want:
            raise HFConversionError(f"{where}: {field}={got!r} is not supported (need {want!r})")
    hidden, heads = int(hf_config["hidden_size"]), int(hf_config["num_attention_heads"])
    head_dim = hf_config.get("head_dim")
    if head_dim is not None and heads * int(head_dim) != hidden:
        raise HFConversionError(
            f"{where}: head_dim={head_dim} * num_attention_heads={heads} != "
            f"hidden_size={hidden}; only head_dim = hidden_size / heads is supported"
        )
    try:
        return ModelConfig(
            family=family,
            num_layers=int(hf_config["num_hidden_layers"]),
            hidden_size=hidden,
            ffn_hidden_size=int(hf_config["intermediate_size"]),
            num_attention_heads=heads,
            num_query_groups=int(hf_config.get("num_key_value_heads") or heads),
            vocab_size=int(hf_config["vocab_size"]),
            max_sequence_length=int(hf_config.get("max_position_embeddings", 4096)),
            rotary_base=_rope_theta(hf_config, where),
            norm_epsilon=float(hf_config.get("rms_norm_eps", 1e-6)),
            qkv_bias=family == "qwen2",
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
            init_method_std=float(hf_config.get("initializer_range", 0.02)),
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            bf16=str(hf_config.get("torch_dtype", hf_config.get("dtype", "bfloat16"))) == "bfloat16",
        )
    except KeyError as err:
        raise HFConversionError(f"{where}: required field {err.args[0]!r} is missing") from None
    except ConfigError as err:
        raise HFConversionError(f"{where}: {err}") from None


# Fields whose disagreement means the weights cannot be used by this model at all.
_MUST_MATCH = (
    "family",
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "vocab_size",
    "qkv_bias",
    "tie_word_embeddings",
)


def check_compatible(model_cfg: ModelConfig, hf_cfg: ModelConfig, *, where: str) -> None:
    """Raise naming every field where the model we built differs from the HF checkpoint."""
    diffs = [
        f"model.{f}={getattr(model_cfg, f)!r} but {where} has {getattr(hf_cfg, f)!r}"
        for f in _MUST_MATCH
        if getattr(model_cfg, f) != getattr(hf_cfg, f)
    ]
    for f in ("rotary_base", "norm_epsilon"):
        if abs(float(getattr(model_cfg, f)) - float(getattr(hf_cfg, f))) > 1e-12 * max(1.0, abs(getattr(hf_cfg, f))):
            diffs.append(f"model.{f}={getattr(model_cfg, f)!r} but {where} has {getattr(hf_cfg, f)!r}")
    if diffs:
        raise HFConversionError("model config does not match the HF checkpoint: " + "; ".join(diffs))


def hf_config_dict(model_cfg: ModelConfig, *, dtype: str = "float32") -> dict[str, Any]:
    """A transformers config dict for ``model_cfg`` (what :func:`export_hf` writes)."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=model_cfg.vocab_size,
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.ffn_hidden_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_key_value_heads=model_cfg.num_query_groups,
        max_position_embeddings=model_cfg.max_sequence_length,
        rms_norm_eps=model_cfg.norm_epsilon,
        tie_word_embeddings=model_cfg.tie_word_embeddings,
        hidden_act="silu",
        initializer_range=model_cfg.init_method_std,
        rope_theta=float(model_cfg.rotary_base),
    )
    if model_cfg.family == "qwen2":
        cfg = Qwen2Config(**common)
        arch = "Qwen2ForCausalLM"
    else:
        cfg = LlamaConfig(**common, attention_bias=False, mlp_bias=False, head_dim=model_cfg.head_dim)
        arch = "LlamaForCausalLM"
    cfg.architectures = [arch]
    out = cfg.to_dict()
    out["torch_dtype"] = out["dtype"] = dtype
    return out
