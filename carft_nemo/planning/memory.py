"""Per-GPU memory of a run's roles before launch: weights, gradients, optimizer states,
activations, logits and the generation K/V cache (pure arithmetic on the configs).

For one rank of a role (the most loaded pipeline stage), with ``P`` its parameters,

    static      = P * (w + g) + P * o / S                    (weights, fp32 gradients, Adam)
    activations = k * L_stage * A_layer + A_embedding           (k micro-batches in flight)
    logits      = n * V / t * (w + 12)                         (the output, an fp32 copy, softmax, grad)
    K/V cache   = 2 * L_stage * b_gen * S_gen * (g_kv / t) * d * w

``w`` bytes per weight (2 in bf16 on GPUs, 4 in fp32 on CPU), ``g`` = 4 (megatron's DDP reduces
gradients in fp32 here: ``grad_reduce_in_fp32``), ``o`` = 12 in bf16 (fp32 master weights and
two Adam moments) or 8 in fp32 (the moments; the weights are the master copy), divided by the
distributed optimizer's shard count ``S`` = data x context parallel (1 without it). With
``optimizer_offload_fraction`` ``f``, the GPU keeps ``(1 - f) P o / S`` and the host
``16 f P / S`` a rank (fp32 copies of the offloaded weights and their gradients, Adam's two
moments; in bf16 or fp32 alike). ``n`` is a
micro-batch's tokens on this rank (rows x sequence / CP), ``V`` the padded vocabulary, ``t``
tensor parallel, ``L_stage`` the layers of the stage, ``k`` = min(PP, micro-batches) under 1F1B
(the first stage holds that many), ``g_kv`` the key/value heads, ``d`` the head size.

``A_layer`` counts what autograd keeps of one transformer layer of this codebase (RMSNorm,
GQA self-attention with RoPE, SwiGLU MLP), per token of the rank (sequence parallelism divides
the norms' share by t too):

    4h (two norms' inputs and outputs, replicated over TP) + (h + 2 g_kv d)/t (Q, K, V)
    + h/t (the attention output) + 3f/t (gate, up, their product)         times w bytes

plus, for unfused attention (megatron's local core and our context-parallel core: CPU, or GPUs
without Transformer Engine), the softmax probabilities ``heads/t * s_q * s_k`` per row and the
keys and values repeated to every query head. Transformer Engine's fused attention keeps
softmax statistics instead (4 bytes per head and token). Selective recompute drops the
attention's share (megatron recomputes core attention); full recompute keeps one layer input
per layer plus one layer's activations during its backward.

This is this codebase's own derivation; Megatron-LM's ``report_theoretical_memory`` (Korthikanti
et al. 2022, Table 2) gives ``s b h (10 + 24/t)`` bytes per layer in bf16 without sequence
parallelism and ``18 + 6/S'``-style optimizer bytes; :func:`megatron_formula` reproduces it
for comparison (benchmarks/memory_plan.py). Neither covers context parallelism, the RL roles,
the K/V cache or the reference kept in host memory; this module does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from carft_nemo.distributed.layout import RECOMPUTE, ParallelConfig
from carft_nemo.models.config import ModelConfig

GIB = 1024**3
# bytes a parameter of an offloaded optimizer shard keeps on the host, in bf16 or fp32: megatron's
# hybrid optimizer holds an fp32 copy of the weight, an fp32 copy of its gradient and Adam's two moments
OFFLOADED_BYTES = 16


@dataclass(frozen=True)
class Precision:
    """Where a role runs: bytes per weight / activation, and whether attention is fused."""

    weight_bytes: int = 2  # bf16
    fused_attention: bool = True  # Transformer Engine's (no s x s probabilities)

    @classmethod
    def gpu(cls, model: ModelConfig, transformer_engine: bool = True) -> Precision:
        return cls(2 if model.bf16 is not False else 4, transformer_engine)

    @classmethod
    def cpu(cls) -> Precision:
        return cls(4, False)

    @property
    def optimizer_bytes(self) -> int:
        """Adam's bytes per parameter before sharding: fp32 master + 2 moments, or 2 moments in fp32."""
        return 12 if self.weight_bytes == 2 else 8


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of one rank: ``embedding`` / ``output`` on the first / last stage, ``per_layer``."""

    embedding: int
    output: int
    per_layer: int
    final_norm: int
    heads: int  # the RL heads on the last stage (value head, CARFT projection)

    def on_stage(self, model: ModelConfig, parallel: ParallelConfig, stage: int) -> int:
        """Parameters of ``stage`` on one tensor-parallel rank."""
        pp = parallel.pipeline_parallel
        total = self.per_layer * (model.num_layers // pp)
        if stage == 0:
            total += self.embedding
        if stage == pp - 1:
            total += self.output + self.final_norm + self.heads
        return total


def parameter_counts(
    model: ModelConfig,
    tensor_parallel: int,
    *,
    value_head: bool = False,
    shared_value_head: bool = False,
    projection_dim: int = 0,
) -> ParameterCounts:
    """One tensor-parallel rank's parameters (norms and the RL heads replicated over TP).

    ``value_head``: a critic (a scalar head instead of the LM output layer). On a policy,
    ``shared_value_head`` adds ReFT's value head and ``projection_dim`` CARFT's projection
    (``h x d``, no bias) on the last stage.
    """
    t = tensor_parallel
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    q_out = model.num_attention_heads * d
    kv_out = 2 * model.num_query_groups * d
    vocab = model.padded_vocab_size(t)
    attention = h * (q_out + kv_out) // t + q_out * h // t + (q_out + kv_out) // t * int(model.qkv_bias)
    mlp = h * 2 * f // t + f * h // t
    per_layer = attention + mlp + 2 * h  # two RMSNorm weights, replicated
    embedding = vocab * h // t
    output = (h + 1) if value_head else (0 if model.tie_word_embeddings else vocab * h // t)
    heads = (h + 1) * int(shared_value_head) + h * projection_dim
    return ParameterCounts(embedding, output, per_layer, h, heads)


@dataclass(frozen=True)
class Workload:
    """What one rank of a role runs: a training micro-batch and / or generation."""

    rows: int  # sequences per micro-batch
    sequence: int  # tokens per sequence (before context parallelism)
    micro_batches: int = 1  # per optimizer step on this rank (pipeline in-flight count)
    trains: bool = True  # gradients, optimizer states and saved activations
    logits: bool = True  # an LM output layer (not a critic's value head)
    generation_rows: int = 0  # K/V cache batch (0: this role does not generate)
    generation_sequence: int = 0  # prompt + response positions cached
    recompute: str = "none"


@dataclass
class RoleMemory:
    """Estimated bytes on one GPU of a role (its most loaded rank), by component."""

    role: str
    ranks: int
    layout: str
    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    logits: float = 0.0
    kv_cache: float = 0.0
    host: float = 0.0  # per node, outside the GPU: host_per_rank times the role's ranks on a node
    host_per_rank: dict[str, float] = field(default_factory=dict)  # bytes per rank by part (plan.HOST_PARTS)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        """Static state plus the larger of the training and the generation phase."""
        static = self.weights + self.gradients + self.optimizer
        return static + max(self.activations + self.logits, self.kv_cache)

    COLUMNS = ("weights", "gradients", "optimizer", "activations", "logits", "kv_cache")


def layer_activation_bytes(
    model: ModelConfig, parallel: ParallelConfig, precision: Precision, rows: int, sequence: int, recompute: str
) -> float:
    """Bytes one transformer layer keeps for its backward on one rank (module docstring).

    Unit counts per token, as autograd holds them (counted on CPU with saved-tensor hooks,
    benchmarks/memory_plan.py): megatron's local layers keep each RMSNorm's input, its
    normalised value and its output (3h a norm), the attention output (h_q/t), query, key and
    value with the keys and values repeated to every query head (3 h_q/t), and the MLP's
    gate-and-up output, the gate's activation, a contiguous copy of the gate and the product
    (5f/t); Transformer Engine's fused layers keep each norm's input and output (2h), query,
    key and value as they are (h_q/t + 2 g d/t), the attention output twice (its fused core
    keeps it for the backward) and the MLP's fused SwiGLU input and output (3f/t).
    """
    t, cp, w = parallel.tensor_parallel, parallel.context_parallel, precision.weight_bytes
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    heads, groups = model.num_attention_heads / t, model.num_query_groups / t
    local_tokens = math.ceil(sequence / cp)
    tokens = rows * local_tokens
    if recompute == "full":
        return tokens * h * w
    norms = h / t if parallel.sequence_parallel else h  # sequence parallelism splits the norms' tokens over TP
    if precision.fused_attention:
        dense = tokens * w * (4 * norms + heads * d + 2 * groups * d + 3 * f / t)
        attention = tokens * (heads * 4 + 2 * heads * d * w)  # softmax statistics; the output, kept twice
        if recompute == "selective":  # megatron recomputes core attention: its inputs are kept
            attention = 0.0
    else:
        dense = tokens * w * (6 * norms + heads * d + 5 * f / t)
        # query and the keys / values repeated to every query head (our CP core gathers them whole),
        # and the probabilities [rows, heads, s_q, s_k]
        attention = tokens * w * heads * d + 2 * rows * sequence * heads * d * w
        attention += rows * heads * local_tokens * sequence * w
        if recompute == "selective":
            attention = tokens * w * heads * d + 2 * rows * local_tokens * groups * d * w  # Q, K, V kept
    return dense + attention


def training_memory(
    role: str,
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: Precision,
    work: Workload,
    *,
    ranks: int,
    value_head: bool = False,
    shared_value_head: bool = False,
    projection_dim: int = 0,
    data_parallel: int = 1,
) -> RoleMemory:
    """One rank's :class:`RoleMemory` for a model role (module docstring for each term)."""
    t, pp, cp = parallel.tensor_parallel, parallel.pipeline_parallel, parallel.context_parallel
    w = precision.weight_bytes
    counts = parameter_counts(
        model, t, value_head=value_head, shared_value_head=shared_value_head, projection_dim=projection_dim
    )
    layout = f"TP{t} PP{pp} CP{cp} DP{data_parallel}"
    # the most loaded stage: with PP > 1 the first keeps the most micro-batches in flight, the
    # last has the output layer; take the larger sum
    best = None
    for stage in range(pp):
        params = counts.on_stage(model, parallel, stage)
        candidate = RoleMemory(role, ranks, layout)
        candidate.weights = params * w
        if work.trains:
            candidate.gradients = params * 4
            shards = data_parallel * cp if parallel.use_distributed_optimizer else 1
            offload = parallel.optimizer_offload_fraction
            candidate.optimizer = params * precision.optimizer_bytes / shards * (1 - offload)
            if offload:
                candidate.host_per_rank["offloaded_optimizer"] = params * OFFLOADED_BYTES / shards * offload
        in_flight = min(pp - stage, work.micro_batches) if pp > 1 else 1
        layers = model.num_layers // pp
        tokens = work.rows * math.ceil(work.sequence / cp)
        if work.trains:
            per_layer = layer_activation_bytes(model, parallel, precision, work.rows, work.sequence, work.recompute)
            if work.recompute == "full":  # one layer's full set during its recomputed backward
                extra = layer_activation_bytes(model, parallel, precision, work.rows, work.sequence, "none")
            else:
                extra = 0.0
            ends = tokens * 8 if stage == 0 else 0.0  # the token ids
            if stage == pp - 1:  # the final norm's input, normalised value and output (2 with TE)
                norm_width = model.hidden_size / (t if parallel.sequence_parallel else 1)
                ends += tokens * norm_width * w * (2 if precision.fused_attention else 3)
            candidate.activations = in_flight * (layers * per_layer + ends) + extra
        if stage == pp - 1 and work.logits:
            # the output layer's logits, the loss's fp32 copy (its softmax, kept for the backward)
            # and the gradient of the logits
            vocab = model.padded_vocab_size(t) / t
            candidate.logits = tokens * vocab * (w + 8) if work.trains else tokens * vocab * (w + 4)
        if work.generation_rows:
            kv = 2 * layers * work.generation_rows * work.generation_sequence * model.num_query_groups / t
            candidate.kv_cache = kv * model.head_dim * w
        if best is None or candidate.peak > best.peak:
            best = candidate
    assert best is not None
    return best


def megatron_formula(
    model: ModelConfig, parallel: ParallelConfig, rows: int, sequence: int, micro_batches: int, data_parallel: int
) -> dict[str, float]:
    """Megatron-LM's theoretical memory (``report_theoretical_memory``, bf16, no sequence parallel),
    restated for comparison: weights + optimizer and activations of the most loaded rank, bytes."""
    t, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    h, vocab = model.hidden_size, model.padded_vocab_size(t)
    q = model.num_attention_heads * model.head_dim
    attention = 2 * h * h * (1 + model.num_query_groups / model.num_attention_heads) * q / h
    layer = 2 * h * (model.ffn_hidden_size * 1.5 + 1) + attention
    block = layer * model.num_layers + h
    most_loaded = (block / pp + vocab * h) / t
    if not model.tie_word_embeddings and pp == 1:
        most_loaded += vocab * h / t
    per_param = 6 + 12 / data_parallel if parallel.use_distributed_optimizer else 18
    activations = sequence * rows * h * (10 + 24 / t) * model.num_layers
    activations += 8 * sequence * rows * pp + sequence * rows * h * pp
    if pp > 1:
        activations *= min(1, micro_batches / pp)
    else:
        activations += (sequence * rows * vocab / t + sequence * rows * h) * 2
    activations *= 1.05
    return {"weights_and_optimizer": most_loaded * per_param, "activations": activations}


__all__ = [
    "GIB",
    "RECOMPUTE",
    "ParameterCounts",
    "Precision",
    "RoleMemory",
    "Workload",
    "layer_activation_bytes",
    "megatron_formula",
    "parameter_counts",
    "training_memory",
]
