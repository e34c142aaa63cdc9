"""The memory planner against measured peaks: one SFT training step per layout, on CPU.

For each preset and layout, ``torchrun`` starts the layout's ranks (gloo); each builds its shard
of the model, megatron's DDP and Adam, and runs one optimizer step of ``micro_batches`` x ``rows``
sequences of ``sequence`` tokens. Measured: the growth of the process's peak resident memory
from just before the model is built to after the step (the largest over the ranks), which holds
the weights, fp32 gradients, Adam's states, the saved activations and the logits' temporaries.
Planned: :mod:`carft_nemo.planning.memory` with ``Precision.cpu()`` (fp32, unfused attention)
for the same role. Also recorded: Megatron-LM's theoretical formula for the paper-scale 7B
layouts beside the planner's figure (both bf16 on GPUs; the formula has no context parallelism,
no RL roles and no K/V cache). Results in ``benchmarks/results/memory_plan.json``:

    python -m benchmarks.memory_plan [--quick]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import parse_args, print_table, write_result

ROOT = Path(__file__).resolve().parents[1]
# (preset, tensor parallel, pipeline parallel, rows, sequence, micro-batches)
LAYOUTS = [
    ("tiny", 1, 1, 8, 256, 2),
    ("tiny", 2, 1, 8, 256, 2),
    ("tiny", 1, 2, 8, 256, 2),
    ("small_100m", 1, 1, 4, 512, 2),
    ("small_100m", 2, 1, 4, 512, 2),
    ("small_100m", 1, 2, 4, 512, 2),
]
QUICK = [LAYOUTS[0], LAYOUTS[1]]
MEASURED = "peak RSS growth of the largest rank over two SFT optimizer steps (CPU, fp32)"


def worker(spec: dict) -> None:
    import resource

    import psutil
    import torch
    import torch.distributed as dist

    from carft_nemo.algorithms.sft import masked_token_nll_sum, shift_for_next_token
    from carft_nemo.distributed.layout import ParallelConfig, ProcessInfo, initialize, shutdown
    from carft_nemo.models.config import ModelConfig
    from carft_nemo.models.gpt import build_gpt_model
    from carft_nemo.models.logprobs import token_logprobs
    from carft_nemo.training.forward_backward import run_forward_backward
    from carft_nemo.training.optim import OptimConfig, make_trainable

    torch.set_num_threads(1)
    process = ProcessInfo.from_env()
    cfg = ModelConfig(preset=spec["model"], max_sequence_length=spec["sequence"] + 1).with_vocab(spec["vocab"])
    parallel = ParallelConfig(tensor_parallel=spec["tp"], pipeline_parallel=spec["pp"])
    initialize(parallel, process=process, **cfg.layout_dims)
    try:
        g = torch.Generator().manual_seed(0)
        rows = spec["rows"] * spec["micro_batches"]
        tokens = torch.randint(0, spec["vocab"], (rows, spec["sequence"] + 1), generator=g)
        inputs, labels, mask = shift_for_next_token(tokens, torch.ones_like(tokens, dtype=torch.float))
        rss_before = psutil.Process().memory_info().rss
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model = build_gpt_model(cfg, parallel)
        trainable = make_trainable(model, cfg, parallel, OptimConfig(lr=1e-6, schedule="constant"), 10)

        def loss_fn(logits, micro):
            return masked_token_nll_sum(token_logprobs(logits, micro["labels"]), micro["loss_mask"]), {}

        for _ in range(2):  # the second step runs with Adam's states allocated: the steady state
            trainable.zero_grad()
            batch = {"tokens": inputs, "labels": labels, "loss_mask": mask}
            run_forward_backward(trainable.model, batch, loss_fn=loss_fn, normalizer=float(mask.sum()),
                                 micro_batch_size=spec["rows"])  # fmt: skip
            trainable.step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        mine = {"growth": peak - rss_before, "stale_peak": peak_before > peak}
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        if process.rank == 0:
            Path(spec["result_path"]).write_text(json.dumps(every))
    finally:
        shutdown()


def measure(preset: str, tp: int, pp: int, rows: int, sequence: int, micro_batches: int, vocab: int) -> list[dict]:
    from carft_nemo.distributed.layout import free_port

    spec = {"model": preset, "tp": tp, "pp": pp, "rows": rows, "sequence": sequence,
            "micro_batches": micro_batches, "vocab": vocab}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        spec["result_path"] = str(Path(tmp) / "result.json")
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", str(tp * pp), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), __file__, "--worker", json.dumps(spec)]  # fmt: skip
        # glibc returns every block of 64 KiB or more to the system when it is freed (no dynamic
        # mmap threshold, no trim slack), so the resident size follows the live tensors
        malloc = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **malloc)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"memory_plan worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(Path(spec["result_path"]).read_text())


def planned(preset: str, tp: int, pp: int, rows: int, sequence: int, micro_batches: int, vocab: int) -> float:
    from carft_nemo.distributed.layout import ParallelConfig
    from carft_nemo.models.config import ModelConfig
    from carft_nemo.planning.memory import Precision, Workload, training_memory

    model = ModelConfig(preset=preset, max_sequence_length=sequence + 1).with_vocab(vocab)
    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    work = Workload(rows=rows, sequence=sequence, micro_batches=micro_batches)
    return training_memory("sft", model, parallel, Precision.cpu(), work, ranks=tp * pp).peak


def megatron_comparison() -> list[dict]:
    """The paper-scale 7B SFT layouts: the planner's and Megatron-LM's formula's static and activation bytes."""
    from carft_nemo.distributed.layout import ParallelConfig
    from carft_nemo.models.config import ModelConfig
    from carft_nemo.planning.memory import GIB, Precision, Workload, megatron_formula, training_memory

    rows = []
    for preset, vocab in (("qwen2_5_7b", 151665), ("codellama_7b", 32016)):
        model = ModelConfig(preset=preset).with_vocab(vocab)
        parallel = ParallelConfig(tensor_parallel=2, use_distributed_optimizer=True)
        ours = training_memory("sft", model, parallel, Precision.gpu(model), Workload(rows=4, sequence=1024,
                               micro_batches=4), ranks=8, data_parallel=4)  # fmt: skip
        theirs = megatron_formula(model, parallel, rows=4, sequence=1024, micro_batches=4, data_parallel=4)
        rows.append({
            "model": preset, "layout": "TP2 DP4, distributed optimizer, 4 x 1024 tokens",
            "ours_static_GiB": (ours.weights + ours.gradients + ours.optimizer) / GIB,
            "megatron_static_GiB": theirs["weights_and_optimizer"] / GIB,
            "ours_activations_GiB": (ours.activations + ours.logits) / GIB,
            "megatron_activations_GiB": theirs["activations"] / GIB,
        })  # fmt: skip
    return rows


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
        return
    args = parse_args("memory_plan", __doc__.splitlines()[0])
    table = []
    for preset, tp, pp, rows, sequence, micro in QUICK if args.quick else LAYOUTS:
        vocab = 512 if preset == "tiny" else 16384
        ranks = measure(preset, tp, pp, rows, sequence, micro, vocab)
        measured = max(r["growth"] for r in ranks)
        plan = planned(preset, tp, pp, rows, sequence, micro, vocab)
        table.append({
            "preset": preset, "layout": f"TP{tp} PP{pp}", "tokens": f"{micro}x{rows}x{sequence}",
            "measured_MiB": measured / 2**20, "planned_MiB": plan / 2**20, "error": plan / measured - 1,
            "stale_peak": any(r["stale_peak"] for r in ranks),
        })  # fmt: skip
    print_table(table)
    comparison = megatron_comparison()
    print_table(comparison)
    worst = max(abs(r["error"]) for r in table)
    print(f"largest planner error against the measured peak: {worst:.0%}")
    write_result(args.out, {"quick": args.quick, "cpu_layouts": table, "largest_error": worst,
                            "megatron_comparison": comparison,
                            "measured": MEASURED})  # fmt: skip


if __name__ == "__main__":
    main()
