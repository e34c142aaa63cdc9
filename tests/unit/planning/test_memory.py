"""The memory planner's terms on hand-computed cases (carft_nemo/planning/memory.py)."""

from __future__ import annotations

import dataclasses

import pytest

from carft_nemo.distributed.layout import ParallelConfig
from carft_nemo.models.config import ModelConfig
from carft_nemo.planning.memory import (
    GIB,
    Precision,
    Workload,
    layer_activation_bytes,
    megatron_formula,
    parameter_counts,
    training_memory,
)

# h 8, f 16, 2 heads of 4, 1 key/value group, 2 layers, vocab 32 (divisible by 8 x TP)
SMALL = ModelConfig(
    family="llama", num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2, num_query_groups=1,
    vocab_size=32, max_sequence_length=64, rotary_base=10000.0, norm_epsilon=1e-5, make_vocab_size_divisible_by=8,
)  # fmt: skip


def test_parameters_by_hand():
    counts = parameter_counts(SMALL, 1)
    # attention: QKV 8 x (8 + 2 x 4) = 128, out 8 x 8 = 64; MLP: 8 x 32 + 16 x 8 = 384; norms 16
    assert counts.per_layer == 128 + 64 + 384 + 16
    assert counts.embedding == counts.output == 32 * 8 and counts.final_norm == 8
    tp2 = parameter_counts(SMALL, 2)
    assert tp2.per_layer == 64 + 32 + 192 + 16  # norms replicated
    assert tp2.on_stage(SMALL, ParallelConfig(tensor_parallel=2), 0) == 2 * tp2.per_layer + 128 + 128 + 8
    pp2 = ParallelConfig(pipeline_parallel=2)
    assert [counts.on_stage(SMALL, pp2, s) for s in (0, 1)] == [592 + 256, 592 + 256 + 8]
    critic = parameter_counts(SMALL, 1, value_head=True)
    assert critic.output == 9  # a scalar head with its bias
    assert parameter_counts(SMALL, 1, shared_value_head=True, projection_dim=4).heads == (8 + 1) + 8 * 4


def test_static_bytes_per_parameter():
    work = Workload(rows=1, sequence=8)
    params = 2 * 592 + 256 + 256 + 8
    bf16 = training_memory("sft", SMALL, ParallelConfig(), Precision(2, True), work, ranks=1)
    assert (bf16.weights, bf16.gradients, bf16.optimizer) == (2 * params, 4 * params, 12 * params)  # 18 a parameter
    fp32 = training_memory("sft", SMALL, ParallelConfig(), Precision.cpu(), work, ranks=1)
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (4 * params, 4 * params, 8 * params)
    sharded = training_memory("sft", SMALL, ParallelConfig(use_distributed_optimizer=True, context_parallel=2),
                              Precision(2, True), work, ranks=8, data_parallel=4)  # fmt: skip
    assert sharded.optimizer == 12 * params / 8  # over data x context parallel
    frozen = training_memory("reference", SMALL, ParallelConfig(), Precision(2, True), Workload(1, 8, trains=False),
                             ranks=1)  # fmt: skip
    assert frozen.gradients == frozen.optimizer == frozen.activations == 0 and frozen.logits == 8 * 32 * 6


def test_an_offloaded_optimizer_share_moves_to_the_host():
    work = Workload(rows=1, sequence=8)
    params = 2 * 592 + 256 + 256 + 8
    parallel = ParallelConfig(use_distributed_optimizer=True, optimizer_offload_fraction=0.25)
    offloaded = training_memory("sft", SMALL, parallel, Precision(2, True), work, ranks=4, data_parallel=4)
    assert offloaded.optimizer == pytest.approx(12 * params / 4 * 0.75)
    # master weights and moments (12 bytes) and an fp32 gradient copy (4) of a quarter of the shard
    assert offloaded.host_per_rank["offloaded_optimizer"] == pytest.approx(16 * params / 4 * 0.25)
    assert offloaded.weights == 2 * params and offloaded.gradients == 4 * params  # unchanged on the GPU
    fp32 = training_memory("sft", SMALL, parallel, Precision(4, True), work, ranks=4, data_parallel=4)
    assert fp32.optimizer == pytest.approx(8 * params / 4 * 0.75)  # the moments; the weights are the master copy
    assert fp32.host_per_rank == offloaded.host_per_rank  # the host still keeps its own fp32 weight copy


def test_layer_activations_by_hand():
    # 2 rows x 8 tokens, bf16, fused attention: 16 x 2 x (4 x 8 + 8 + 2 x 4 + 48) = 3,072; softmax
    # statistics 16 x 2 heads x 4 = 128; the attention output twice: 16 x 2 x 2 x 4 x 2 = 512
    fused = layer_activation_bytes(SMALL, ParallelConfig(), Precision(2, True), 2, 8, "none")
    assert fused == 3072 + 128 + 512
    assert layer_activation_bytes(SMALL, ParallelConfig(), Precision(2, True), 2, 8, "selective") == 3072
    assert layer_activation_bytes(SMALL, ParallelConfig(), Precision(2, True), 2, 8, "full") == 16 * 8 * 2
    # unfused fp32: 16 x 4 x (6 x 8 + 8 + 80) = 8,704; Q 16 x 4 x 8 = 512, K and V repeated 1,024,
    # probabilities 2 x 2 x 8 x 8 x 4 = 1,024
    assert layer_activation_bytes(SMALL, ParallelConfig(), Precision.cpu(), 2, 8, "none") == 8704 + 512 + 1024 + 1024
    # context parallel 2: a rank's 8 tokens; the gathered keys and values and the probabilities
    # against all 8 positions stay whole
    cp = layer_activation_bytes(SMALL, ParallelConfig(context_parallel=2), Precision.cpu(), 2, 8, "none")
    assert cp == 8704 / 2 + 512 / 2 + 1024 + 1024 / 2


def test_pipeline_stages_hold_their_in_flight_micro_batches():
    parallel = ParallelConfig(pipeline_parallel=2)
    deep = dataclasses.replace(SMALL, num_layers=8)
    one = training_memory("sft", deep, parallel, Precision(2, True), Workload(2, 64, micro_batches=1), ranks=2)
    four = training_memory("sft", deep, parallel, Precision(2, True), Workload(2, 64, micro_batches=4), ranks=2)
    # under 1F1B the first stage holds 2 micro-batches (PP of them), the last one: with 4 layers a
    # stage the first becomes the most loaded rank
    layer = layer_activation_bytes(deep, parallel, Precision(2, True), 2, 64, "none")
    assert four.activations == 2 * (4 * layer + 2 * 64 * 8)  # its layers and the token ids, twice
    assert one.activations < four.activations and four.peak > one.peak


def test_the_static_part_matches_megatron_s_formula_at_7b():
    model = ModelConfig(preset="qwen2_5_7b").with_vocab(151665)
    parallel = ParallelConfig(tensor_parallel=2, use_distributed_optimizer=True)
    ours = training_memory("sft", model, parallel, Precision.gpu(model), Workload(4, 1024), ranks=8, data_parallel=4)
    theirs = megatron_formula(model, parallel, rows=4, sequence=1024, micro_batches=4, data_parallel=4)
    static = ours.weights + ours.gradients + ours.optimizer
    assert static == pytest.approx(theirs["weights_and_optimizer"], rel=1e-3)
    assert 25 < static / GIB < 40  # 3.8B parameters a rank x (2 + 4 + 12 / 4) bytes
