"""Build megatron-core GPT models (policy and critic) from a :class:`ModelConfig`.

The model sees the parallel layout only through megatron's parallel state (set up by
:func:`carft_nemo.distributed.layout.initialize`): TP shards the linear layers, PP builds
only this stage's layers (``pre_process`` on the first stage, ``post_process`` on the last).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from carft_nemo import compat
from carft_nemo.distributed import axes, cpu_compat, device
from carft_nemo.distributed.layout import ParallelConfig
from carft_nemo.models.config import ModelConfig
from carft_nemo.models.cp_attention import ContextParallelAttention
from carft_nemo.models.heads import ValueHead


def transformer_config(model: ModelConfig, parallel: ParallelConfig) -> TransformerConfig:
    """megatron TransformerConfig for the Llama/Qwen2 architecture.

    Fusions that need CUDA kernels are off on CPU; on GPU the TE spec provides them.
    """
    on_gpu = device.has_cuda()
    dtype = device.default_dtype(model.bf16)
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        context_parallel_size=parallel.context_parallel,
        cp_comm_type=parallel.cp_comm_type if parallel.context_parallel > 1 else None,  # TE's attention only
        **_recompute(parallel.recompute),
        sequence_parallel=parallel.sequence_parallel,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        cross_entropy_loss_fusion=False,
    )
    fields = compat.transformer_config_fields()
    return TransformerConfig(**{k: v for k, v in kwargs.items() if k in fields})


def _recompute(setting: str) -> dict:
    """megatron's recompute fields for ``parallel.recompute``: full recomputes every layer from its input."""
    if setting == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    if setting == "selective":
        return {"recompute_granularity": "selective"}
    return {}


def build_gpt_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    value_head: bool = False,
    pre_process: bool | None = None,
    post_process: bool | None = None,
) -> GPTModel:
    """A GPTModel for this rank's pipeline stage and tensor shard.

    ``value_head=True`` builds a critic: the LM output layer is replaced by a scalar head
    and the model returns values ``[b, s, 1]`` instead of vocab-parallel logits ``[b, s, V/tp]``.
    """
    pre = axes.is_first_stage() if pre_process is None else pre_process
    post = axes.is_last_stage() if post_process is None else post_process
    config = transformer_config(model, parallel)
    use_te = compat.transformer_engine_available()
    # cuda_as_cpu_context: with tied embeddings and PP > 1, megatron moves the last stage's
    # output weight with ``.cuda()`` before all-reducing it over the embedding group.
    with cpu_compat.cuda_as_cpu_context():
        gpt = _gpt_model(config, model, parallel, use_te, pre, post, value_head)
    if value_head and post:
        gpt.output_layer = ValueHead(config)
    gpt.to(device.local_device())
    return gpt


def _layer_spec(use_te: bool, parallel: ParallelConfig):
    """megatron's layer spec; without TE and with context parallelism, our core attention in it
    (megatron's local one asserts a context-parallel size of 1: models/cp_attention.py)."""
    spec = compat.gpt_layer_spec(use_te)
    if parallel.context_parallel > 1 and not use_te:
        spec.submodules.self_attention.submodules.core_attention = ContextParallelAttention
    return spec


def _gpt_model(
    config: TransformerConfig,
    model: ModelConfig,
    parallel: ParallelConfig,
    use_te: bool,
    pre: bool,
    post: bool,
    value_head: bool,
) -> GPTModel:
    return GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(use_te, parallel),
        vocab_size=model.padded_vocab_size(parallel.tensor_parallel),
        max_sequence_length=model.max_sequence_length,
        pre_process=pre,
        post_process=post,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_word_embeddings and not value_head,
        position_embedding_type="rope",
        rotary_base=int(model.rotary_base),
    )
