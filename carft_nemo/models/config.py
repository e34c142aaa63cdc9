"""Model architecture config (Llama family and Qwen2) and named presets.

The presets' numbers are the published architectures (CodeLlama-7B, Qwen2.5-7B-Instruct)
or small shapes for CPU work. ``vocab_size`` is the tokenizer's size; the embedding is
padded up to a multiple of ``make_vocab_size_divisible_by * tensor_parallel`` as megatron
does, and the padding is dropped again on HF export.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from carft_nemo.config import ConfigError, require

FAMILIES = ("llama", "qwen2")
_FALLBACKS = {
    "init_method_std": 0.02,
    "make_vocab_size_divisible_by": 128,
    "bf16": True,
    "qkv_bias": False,
    "tie_word_embeddings": False,
    "vocab_size": 0,
}


@dataclass
class ModelConfig:
    """A decoder-only transformer of the Llama family (RMSNorm, SwiGLU, RoPE, GQA)."""

    preset: str | None = None  # fills the fields below that the YAML leaves at None
    family: str | None = None  # "llama" | "qwen2" (QKV bias)
    num_layers: int | None = None
    hidden_size: int | None = None
    ffn_hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_query_groups: int | None = None  # GQA key/value heads; = heads for MHA
    vocab_size: int | None = None  # tokenizer size (0 = take it from the tokenizer)
    max_sequence_length: int | None = None
    rotary_base: float | None = None
    norm_epsilon: float | None = None
    qkv_bias: bool | None = None
    tie_word_embeddings: bool | None = None
    init_method_std: float | None = None  # default 0.02
    make_vocab_size_divisible_by: int | None = None  # default 128
    bf16: bool | None = None  # default True; used on GPU only, CPU runs fp32

    @property
    def is_unset(self) -> bool:
        """No preset and no field given: a recipe's placeholder, filled from YAML later."""
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))

    def __post_init__(self) -> None:
        # Recipe schemas default to an empty ModelConfig so that a YAML ``preset`` is applied
        # to untouched fields (a pre-filled default would shadow the preset's values).
        if self.is_unset:
            return
        if self.preset is not None:
            require(
                self.preset in PRESETS,
                "preset",
                f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}",
            )
            base = PRESETS[self.preset]
            for f in dataclasses.fields(self):
                if getattr(self, f.name) is None and f.name != "preset":
                    setattr(self, f.name, getattr(base, f.name))
        for name, default in _FALLBACKS.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        if self.num_query_groups is None and self.num_attention_heads is not None:
            self.num_query_groups = self.num_attention_heads
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "max_sequence_length"):
            value = getattr(self, name)
            require(value is not None, name, "is required (or set preset)")
            require(isinstance(value, int) and value > 0, name, f"must be a positive integer, got {value!r}")
        require(self.family in FAMILIES, "family", f"must be one of {FAMILIES}, got {self.family!r}")
        require(
            self.hidden_size % self.num_attention_heads == 0,
            "hidden_size",
            f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}",
        )
        require(
            self.num_query_groups > 0 and self.num_attention_heads % self.num_query_groups == 0,
            "num_query_groups",
            f"{self.num_query_groups} must divide num_attention_heads={self.num_attention_heads}",
        )
        require(
            self.vocab_size is not None and self.vocab_size >= 0,
            "vocab_size",
            f"must be >= 0 (0 = from the tokenizer), got {self.vocab_size!r}",
        )
        require(self.rotary_base is not None and self.rotary_base > 0, "rotary_base", "must be > 0")
        require(self.norm_epsilon is not None and 0 < self.norm_epsilon < 1, "norm_epsilon", "must be in (0, 1)")
        require(self.make_vocab_size_divisible_by >= 1, "make_vocab_size_divisible_by", "must be >= 1")
        self.qkv_bias = bool(self.qkv_bias)
        self.tie_word_embeddings = bool(self.tie_word_embeddings)

    @property
    def layout_dims(self) -> dict[str, int]:
        """The sizes a parallel layout must divide (keyword arguments of ``validate_layout``)."""
        return {
            "num_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_query_groups": self.num_query_groups,
        }

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_parallel: int) -> int:
        """Embedding rows: vocab rounded up so each tensor-parallel shard is equal."""
        if not self.vocab_size:
            raise ConfigError("model.vocab_size: unknown; set it or load a tokenizer first")
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return -(-self.vocab_size // multiple) * multiple

    def with_vocab(self, vocab_size: int) -> ModelConfig:
        return dataclasses.replace(self, preset=None, vocab_size=vocab_size)

    def num_parameters(self) -> int:
        """Parameter count (unpadded vocab), for logs and MFU."""
        h, f, v, L = self.hidden_size, self.ffn_hidden_size, self.vocab_size or 0, self.num_layers
        kv = self.num_query_groups * self.head_dim
        attn = h * h + 2 * h * kv + h * h + (h + 2 * kv if self.qkv_bias else 0)
        mlp = 3 * h * f
        per_layer = attn + mlp + 2 * h
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return L * per_layer + emb + h


def check_context_window(model: ModelConfig, longest: int, where: str) -> None:
    """At start-up: the run's longest sequence (``where`` names the keys that set it) must fit the
    model's RoPE tables and trained window, ``model.max_sequence_length``. A model taken from the
    checkpoint (no ``model`` section) is checked when it is built."""
    if model.is_unset or model.max_sequence_length is None:
        return
    require(
        longest <= model.max_sequence_length,
        "model.max_sequence_length",
        f"{model.max_sequence_length} is below the longest sequence of this run ({longest} tokens: {where}); "
        "past the model's trained window its RoPE needs scaling (e.g. Qwen2.5's YaRN), which is not supported",
    )


def _preset(**kw) -> ModelConfig:
    return ModelConfig(**kw)


PRESETS: dict[str, ModelConfig] = {}
PRESETS.update(
    # Trains from scratch on the synthetic task in minutes on 2 CPU cores.
    tiny=_preset(
        family="llama",
        num_layers=4,
        hidden_size=256,
        ffn_hidden_size=688,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=0,
        max_sequence_length=256,
        rotary_base=10000.0,
        norm_epsilon=1e-5,
        qkv_bias=False,
        tie_word_embeddings=False,
        make_vocab_size_divisible_by=8,
    ),
    # Unit tests: the smallest shape that still has GQA and several layers.
    micro=_preset(
        family="llama",
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=0,
        max_sequence_length=128,
        rotary_base=10000.0,
        norm_epsilon=1e-5,
        qkv_bias=False,
        tie_word_embeddings=False,
        make_vocab_size_divisible_by=8,
    ),
    # ~110M parameters with a 16k vocabulary: the "~100M" benchmark model.
    small_100m=_preset(
        family="llama",
        num_layers=12,
        hidden_size=768,
        ffn_hidden_size=2048,
        num_attention_heads=12,
        num_query_groups=4,
        vocab_size=16384,
        max_sequence_length=1024,
        rotary_base=10000.0,
        norm_epsilon=1e-5,
        qkv_bias=False,
        tie_word_embeddings=False,
    ),
    # ~0.89B (16 x 2048, GQA 16/8, 32k vocab): the GPU throughput / MFU benchmark model.
    llama_1b=_preset(
        family="llama",
        num_layers=16,
        hidden_size=2048,
        ffn_hidden_size=5632,
        num_attention_heads=16,
        num_query_groups=8,
        vocab_size=32000,
        max_sequence_length=2048,
        rotary_base=10000.0,
        norm_epsilon=1e-5,
        qkv_bias=False,
        tie_word_embeddings=False,
    ),
    codellama_7b=_preset(
        family="llama",
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=11008,
        num_attention_heads=32,
        num_query_groups=32,
        vocab_size=32016,
        max_sequence_length=16384,
        rotary_base=1000000.0,
        norm_epsilon=1e-5,
        qkv_bias=False,
        tie_word_embeddings=False,
    ),
    # Past 7B (configs/*-{2,4}n8g-*.yaml): the HF config.json values of each model.
    qwen2_5_32b=_preset(
        family="qwen2",
        num_layers=64,
        hidden_size=5120,
        ffn_hidden_size=27648,
        num_attention_heads=40,
        num_query_groups=8,
        vocab_size=152064,
        max_sequence_length=32768,
        rotary_base=1000000.0,
        norm_epsilon=1e-6,
        qkv_bias=True,
        tie_word_embeddings=False,
    ),
    qwen2_5_72b=_preset(
        family="qwen2",
        num_layers=80,
        hidden_size=8192,
        ffn_hidden_size=29568,
        num_attention_heads=64,
        num_query_groups=8,
        vocab_size=152064,
        max_sequence_length=32768,
        rotary_base=1000000.0,
        norm_epsilon=1e-6,
        qkv_bias=True,
        tie_word_embeddings=False,
    ),
    codellama_34b=_preset(
        family="llama",
        num_layers=48,
        hidden_size=8192,
        ffn_hidden_size=22016,
        num_attention_heads=64,
        num_query_groups=8,
        vocab_size=32000,
        max_sequence_length=16384,
        rotary_base=1000000.0,
        norm_epsilon=1e-5,
        qkv_bias=False,
        tie_word_embeddings=False,
    ),
    qwen2_5_7b=_preset(
        family="qwen2",
        num_layers=28,
        hidden_size=3584,
        ffn_hidden_size=18944,
        num_attention_heads=28,
        num_query_groups=4,
        vocab_size=152064,
        max_sequence_length=32768,
        rotary_base=1000000.0,
        norm_epsilon=1e-6,
        qkv_bias=True,
        tie_word_embeddings=False,
    ),
)
