"""CARFT contrastive module: batched LCS speed-up and loss cost relative to a training micro-step.

1. LCS: ``lcs_masks`` on 64 pairs of 512 tokens against a straightforward pure-Python
   O(nm) DP with traceback (plain lists, no numpy: what the paper's ``cl.py`` does per pair),
   same inputs, in one run. ``lcs_speedup_vs_python_dp`` is the ratio of process CPU times
   (the host's 2 cores are shared, so wall time stretches with other people's load): the
   Python DP's total over the 64 pairs against the median of 32 ``lcs_masks`` calls, one
   after every 2 pairs of the DP (their minimum is reported too);
   ``lcs_speedup_vs_python_dp_wall`` is the wall-time ratio.
   ``lcs_masks`` runs with one intra-op thread on CPU (it sets and restores that itself).
2. Contrastive loss (mode "both": pooling of 4 spans, projection head, two InfoNCE terms)
   forward + backward on the tiny preset's shapes (hidden 256, seq 256, batch 8, d 64),
   relative to one forward + backward micro-step of the tiny megatron GPT model
   (``build_gpt_model``), or of an equivalent ``nn.TransformerEncoder`` if megatron's
   model cannot be built here (recorded in ``train_microstep_model``).

``--quick`` times the Python DP on 4 pairs and scales to 64 (its cost is linear in pairs)
and repeats the torch timings fewer times.

Results are recorded in ``benchmarks/results/contrastive.json``. Run from the repository root:

    python -m benchmarks.contrastive [--quick]
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.common import parse_args, print_table, write_result
from carft_nemo.algorithms.contrastive import ContrastiveConfig, CoTBatch, contrastive_loss, lcs_spans
from carft_nemo.algorithms.lcs import lcs_masks
from carft_nemo.models.contrastive_head import ContrastiveHead

PAIRS, LCS_LEN, VOCAB = 64, 512, 1000
HIDDEN, SEQ, BATCH, HEADS, LAYERS, PROJ = 256, 256, 8, 4, 4, 64


def python_lcs(x: list[int], y: list[int]) -> tuple[list[int], list[int]]:
    """Textbook DP table + traceback; returns the LCS positions in x and in y."""
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            if x[i - 1] == y[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    i, j, xs, ys = n, m, [], []
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            xs.append(i - 1)
            ys.append(j - 1)
            i, j = i - 1, j - 1
        elif table[i - 1][j] >= table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return xs[::-1], ys[::-1]


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall time and median process CPU time (all threads) of ``repeats`` calls, after a warm-up.

    CPU time is reported too because the benchmark host's cores are shared: under load the
    wall time of many small tensor ops stretches far more than that of one Python loop.
    """
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def bench_lcs(quick: bool) -> dict[str, float]:
    """Python DP pair by pair, one ``lcs_masks`` call after every ``chunk`` pairs (interleaved).

    Interleaving puts both sides under the same machine conditions (the host is a shared VM
    whose speed drifts within minutes), so their ratio is steadier than that of two blocks
    timed one after the other.
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, VOCAB, (PAIRS, LCS_LEN), generator=gen)
    b = a.clone()
    edit = torch.rand(PAIRS, LCS_LEN, generator=gen) < 0.3  # CoT-like pairs: 70% shared tokens
    b[edit] = torch.randint(0, VOCAB, (int(edit.sum()),), generator=gen)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    timed_pairs, chunk = (4, 1) if quick else (PAIRS, 2)
    result = lcs_masks(a, b)  # warm-up (and the answers checked below)
    walls, cpus, ref = [], [], []
    python_s = python_cpu = 0.0
    for start in range(0, timed_pairs, chunk):
        wall, cpu = time.perf_counter(), time.process_time()
        ref += [python_lcs(a[k].tolist(), b[k].tolist()) for k in range(start, min(start + chunk, timed_pairs))]
        python_s += time.perf_counter() - wall
        python_cpu += time.process_time() - cpu
        wall, cpu = time.perf_counter(), time.process_time()
        lcs_masks(a, b)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    python_s *= PAIRS / timed_pairs
    python_cpu *= PAIRS / timed_pairs
    torch_s, torch_cpu = statistics.median(walls), statistics.median(cpus)
    assert all(len(ref[k][0]) == int(result.length[k]) for k in range(timed_pairs))
    return {
        "lcs_torch_s": torch_s,
        "lcs_python_dp_s": python_s,
        "python_dp_pairs_timed": timed_pairs,
        "lcs_torch_cpu_s": torch_cpu,
        "lcs_torch_cpu_s_min": min(cpus),
        "lcs_torch_calls_timed": len(cpus),
        "lcs_python_dp_cpu_s": python_cpu,
        "lcs_load_avg_1m_before": load_before,
        "lcs_speedup_vs_python_dp_best_torch_call": python_cpu / min(cpus),
        "lcs_speedup_vs_python_dp": python_cpu / torch_cpu,
        "lcs_speedup_basis": "process CPU time, torch calls interleaved with the Python DP pairs",
        "lcs_speedup_vs_python_dp_cpu_time": python_cpu / torch_cpu,
        "lcs_speedup_vs_python_dp_wall": python_s / torch_s,
    }


def _megatron_microstep() -> tuple[Callable[[], None], str]:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from carft_nemo.distributed.layout import ParallelConfig, ProcessInfo, free_port, initialize
    from carft_nemo.models.config import ModelConfig
    from carft_nemo.models.forward import causal_inputs
    from carft_nemo.models.gpt import build_gpt_model

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    model_cfg = ModelConfig(preset="tiny").with_vocab(1024)
    parallel = ParallelConfig()
    initialize(
        parallel,
        process=ProcessInfo.from_env(),
        num_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
    )
    model = build_gpt_model(model_cfg, parallel)
    tokens = torch.randint(0, 1024, (BATCH, SEQ + 1))
    positions, mask = causal_inputs(tokens[:, :-1])

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss = model(tokens[:, :-1], positions, mask, labels=tokens[:, 1:])
        loss.float().mean().backward()

    return step, "megatron GPTModel, tiny preset (4 layers, hidden 256, 4 heads), vocab 1024, seq 256, batch 8, fp32"


def _torch_microstep() -> tuple[Callable[[], None], str]:
    layer = torch.nn.TransformerEncoderLayer(HIDDEN, HEADS, dim_feedforward=688, batch_first=False)
    model = torch.nn.Sequential(torch.nn.Embedding(1024, HIDDEN), torch.nn.TransformerEncoder(layer, LAYERS))
    head = torch.nn.Linear(HIDDEN, 1024)
    tokens = torch.randint(0, 1024, (SEQ + 1, BATCH))
    causal = torch.nn.Transformer.generate_square_subsequent_mask(SEQ)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        hidden = model[1](model[0](tokens[:-1]), mask=causal, is_causal=True)
        torch.nn.functional.cross_entropy(head(hidden).flatten(0, 1), tokens[1:].flatten()).backward()

    return step, "torch nn.TransformerEncoder stand-in (4 layers, hidden 256, 4 heads), vocab 1024, seq 256, batch 8"


def bench_contrastive(quick: bool) -> dict[str, object]:
    gen = torch.Generator().manual_seed(1)
    head = ContrastiveHead(HIDDEN, PROJ)
    cfg = ContrastiveConfig(mode="both", projection_dim=PROJ)
    prompt = 64
    cot_mask = torch.zeros(SEQ, BATCH, dtype=torch.bool)
    cot_mask[prompt:] = True
    ids_gen = torch.randint(0, 200, (SEQ, BATCH), generator=gen)
    ids_ann = torch.where(
        torch.rand(SEQ, BATCH, generator=gen) < 0.5, ids_gen, torch.randint(0, 200, (SEQ, BATCH), generator=gen)
    )
    hidden_gen = torch.randn(SEQ, BATCH, HIDDEN, generator=gen, requires_grad=True)
    values_gen = torch.randn(SEQ, BATCH, generator=gen, requires_grad=True)
    hidden_ann = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    values_ann = torch.randn(SEQ, BATCH, generator=gen)
    correct = torch.arange(BATCH) % 2 == 0
    spans = lcs_spans(ids_ann, cot_mask, ids_gen, cot_mask)

    def contrastive_step() -> None:
        loss, _ = contrastive_loss(
            cfg,
            CoTBatch(head(hidden_gen), values_gen, cot_mask),
            CoTBatch(head(hidden_ann), values_ann, cot_mask),
            correct,
            spans,
        )
        loss.backward()

    repeats = 3 if quick else 10
    contrastive_s, contrastive_cpu = timed(contrastive_step, repeats)
    lcs_spans_s, _ = timed(lambda: lcs_spans(ids_ann, cot_mask, ids_gen, cot_mask), repeats)
    try:
        step, name = _megatron_microstep()
    except Exception as err:  # noqa: BLE001 - fall back to the stand-in model and say so
        print(f"megatron model unavailable ({type(err).__name__}: {err}); using the torch stand-in")
        step, name = _torch_microstep()
    microstep_s, microstep_cpu = timed(step, 2 if quick else 5)
    return {
        "contrastive_fwd_bwd_s": contrastive_s,
        "contrastive_fwd_bwd_cpu_s": contrastive_cpu,
        "train_microstep_cpu_s": microstep_cpu,
        "contrastive_over_train_microstep_cpu_time": contrastive_cpu / microstep_cpu,
        "lcs_spans_s": lcs_spans_s,
        "train_microstep_s": microstep_s,
        "train_microstep_model": name,
        "contrastive_over_train_microstep": contrastive_s / microstep_s,
        "lcs_spans_over_train_microstep": lcs_spans_s / microstep_s,
    }


def main() -> None:
    args = parse_args("contrastive", __doc__.splitlines()[0])
    lcs = bench_lcs(args.quick)
    loss = bench_contrastive(args.quick)
    print_table(
        [
            {"measure": "LCS 64x512 torch (s)", "value": lcs["lcs_torch_s"]},
            {"measure": "LCS 64x512 python DP (s)", "value": lcs["lcs_python_dp_s"]},
            {"measure": "LCS speed-up, wall (x)", "value": lcs["lcs_speedup_vs_python_dp_wall"]},
            {"measure": "LCS speed-up, CPU time (x)", "value": lcs["lcs_speedup_vs_python_dp_cpu_time"]},
            {"measure": "contrastive fwd+bwd (s)", "value": loss["contrastive_fwd_bwd_s"]},
            {"measure": "lcs_spans b=8 s=256 (s)", "value": loss["lcs_spans_s"]},
            {"measure": "train micro-step (s)", "value": loss["train_microstep_s"]},
            {"measure": "contrastive / micro-step", "value": loss["contrastive_over_train_microstep"]},
        ]
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    path = write_result(
        args.out,
        {
            "quick": args.quick,
            "torch_threads": torch.get_num_threads(),
            "load_avg_1m": load,
            "lcs_pairs": PAIRS,
            "lcs_length": LCS_LEN,
            **lcs,
            **loss,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
