"""Sequence packing: useful tokens/s of the PPO training phase with and without packing.

One process (torchrun, gloo), the actor's real PPO loss through megatron's schedule and
Adam, on a rollout batch whose lengths follow GSM8K's spread (question + annotated answer,
tokens taken as characters / 4, clipped to [32, width]): the same rows, micro-batches and
epochs with ``packing`` off (every row padded to the batch's longest row, as a rollout's
tensors are) and on (each micro-batch's rows in first-fit-decreasing bins of that width).
Useful tokens are the rows' real tokens; both runs do the same optimizer steps on the same
data, so the ratio of their tokens/s is the packing speed-up.

Context parallelism: the activation memory per rank of one long row's SFT forward + backward
at CP 1 (one process) and CP 2 (two, gloo): the bytes autograd saves for the backward, and the
peak RSS growth. Our CPU attention core all-gathers keys and values (ring attention on GPUs
avoids that), so the ratio is a little above 1/2.

Results in ``benchmarks/results/packing.json``:

    python -m benchmarks.packing [--quick] [--model tiny] [--rows 64] [--width 256] [--cp-tokens 2048]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import parse_args, print_table, write_result

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def gsm8k_lengths(rows: int, width: int, seed: int = 0) -> list[int]:
    """``rows`` sequence lengths drawn from GSM8K train (question + answer characters / 4)."""
    import random

    chars = [len(r["question"]) + len(r["answer"]) for r in map(json.loads, GSM8K.read_text().splitlines())]
    rng = random.Random(seed)
    return [min(width, max(32, rng.choice(chars) // 4)) for _ in range(rows)]


def worker(spec: dict) -> None:
    import torch

    from carft_nemo.data.packing import PackingConfig
    from carft_nemo.distributed.layout import ParallelConfig, ProcessInfo, initialize, shutdown
    from carft_nemo.models.config import ModelConfig

    torch.set_num_threads(spec["threads"] or (os.cpu_count() or 1))
    cfg = ModelConfig(preset=spec["model"]).with_vocab(512)
    parallel = ParallelConfig()
    initialize(
        parallel,
        process=ProcessInfo.from_env(),
        num_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
    )
    from carft_nemo.models.forward import unwrap
    from carft_nemo.models.gpt import build_gpt_model
    from carft_nemo.training.optim import OptimConfig, make_trainable
    from carft_nemo.workers.actor_loss import ActorTrainSettings, actor_loss
    from carft_nemo.workers.model_worker import ModelWorker, on_token_positions

    try:
        rows, micro = spec["rows"], spec["micro_batch_size"]
        lengths = torch.tensor(spec["lengths"])
        width = int(lengths.max())  # a rollout batch is as wide as its longest row
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 512, (rows, width), generator=g)
        prompt = (lengths * 0.4).long()  # the question; the rest is the sampled response
        cols = torch.arange(width - 1)[None, :]
        mask = (cols >= (prompt - 1)[:, None]) & (cols < (lengths - 1)[:, None])
        batch = {
            "tokens": tokens,
            "action_mask": mask,
            "old_logprobs": torch.randn(rows, width - 1, generator=g).clamp(-3, 0) * mask,
            "advantages": torch.randn(rows, width - 1, generator=g) * mask,
        }
        settings = ActorTrainSettings(epochs=1, mini_batch_rows=rows, seed=0)
        workers = {}
        for name, packing in (("padded", PackingConfig()), ("packed", PackingConfig(enabled=True))):
            trainable = make_trainable(
                build_gpt_model(cfg, parallel), cfg, parallel, OptimConfig(lr=1e-6, schedule="constant"), 10
            )
            w = ModelWorker()
            w.trainable, w.model = trainable, trainable.model
            w.spec = type("Spec", (), {"parallel": parallel, "packing": packing})()
            workers[name] = w

        def update(w: ModelWorker, seed: int) -> float:
            gpt = unwrap(w.model)

            def make_loss(mini, num_micro):
                return actor_loss(gpt, settings, 512, None, mean_term_weight=0.0), float(mini["action_mask"].sum())

            start = time.perf_counter()
            w.train_epochs(on_token_positions(batch), epochs=1, mini_batch_rows=rows, micro_batch_size=micro, seed=seed,
                           make_loss=make_loss, hidden_to_loss=True)  # fmt: skip
            return time.perf_counter() - start

        times = {name: [] for name in workers}
        for i in range(spec["iters"] + 1):  # interleaved, so drifting load hits both; the first pass warms up
            for name in ("padded", "packed") if i % 2 else ("packed", "padded"):
                times[name].append(update(workers[name], i))
        result = {}
        for name, measured in times.items():
            seconds = sorted(measured[1:])[len(measured[1:]) // 2]
            result[name] = {"seconds_per_update": seconds, "useful_tokens_per_s": int(lengths.sum()) / seconds}
        Path(spec["result_path"]).write_text(json.dumps(result))
    finally:
        shutdown()


def context_parallel_worker(spec: dict) -> None:
    """One SFT forward + backward of ``spec['tokens']``-long rows at this launch's CP (world size).

    Activation memory per rank: the bytes autograd keeps for the backward (each storage once,
    parameters excluded), recorded by saved-tensor hooks; besides, the process's peak RSS growth
    over the step (allocator and library noise included).
    """
    import resource

    import psutil
    import torch

    from carft_nemo.algorithms.sft import masked_token_nll_sum, shift_for_next_token
    from carft_nemo.distributed.layout import ParallelConfig, ProcessInfo, initialize, shutdown
    from carft_nemo.models.config import ModelConfig
    from carft_nemo.models.gpt import build_gpt_model
    from carft_nemo.models.logprobs import token_logprobs
    from carft_nemo.training.forward_backward import run_forward_backward
    from carft_nemo.training.optim import OptimConfig, make_trainable

    torch.set_num_threads(1)
    process = ProcessInfo.from_env()
    cfg = ModelConfig(preset=spec["model"], max_sequence_length=spec["tokens"] + 1).with_vocab(512)
    parallel = ParallelConfig(context_parallel=process.world_size)
    initialize(parallel, process=process, **cfg.layout_dims)
    try:
        model = build_gpt_model(cfg, parallel)
        trainable = make_trainable(model, cfg, parallel, OptimConfig(lr=1e-6, schedule="constant"), 10)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 512, (spec["rows"], spec["tokens"] + 1), generator=g)
        inputs, labels, mask = shift_for_next_token(tokens, torch.ones_like(tokens, dtype=torch.float))
        params = {p.untyped_storage().data_ptr() for p in trainable.model.parameters()}
        seen: dict[int, int] = {}

        def keep(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        def loss_fn(logits, micro):
            return masked_token_nll_sum(token_logprobs(logits, micro["labels"]), micro["loss_mask"]), {}

        trainable.zero_grad()
        rss_before = psutil.Process().memory_info().rss
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            run_forward_backward(trainable.model, {"tokens": inputs, "labels": labels, "loss_mask": mask},
                                 loss_fn=loss_fn, normalizer=float(mask.sum()), micro_batch_size=spec["rows"],
                                 sequence_multiple=parallel.sequence_multiple)  # fmt: skip
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result = {"activation_bytes": sum(seen.values()), "peak_rss_growth": max(0, peak_rss - rss_before)}
        if process.rank == 0:
            Path(spec["result_path"]).write_text(json.dumps(result))
    finally:
        shutdown()


def _torchrun(ranks: int, flag: str, spec: dict) -> dict:
    """Run this file's ``flag`` worker under torchrun on ``ranks`` processes; its JSON result."""
    from carft_nemo.distributed.layout import free_port

    with tempfile.TemporaryDirectory() as tmp:
        spec = {**spec, "result_path": str(Path(tmp) / "result.json")}
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", str(ranks), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), __file__, flag, json.dumps(spec)]  # fmt: skip
        env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"packing benchmark ({flag}) failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(Path(spec["result_path"]).read_text())


def context_parallel_memory(model: str, tokens: int, rows: int) -> dict:
    """Activation memory per rank of one long-sequence forward + backward at CP 1 and CP 2."""
    spec = {"model": model, "tokens": tokens, "rows": rows}
    measured = {f"cp{cp}": _torchrun(cp, "--cp-worker", spec) for cp in (1, 2)}
    ratio = measured["cp2"]["activation_bytes"] / measured["cp1"]["activation_bytes"]
    return {"model": model, "tokens": tokens, "rows": rows, "per_rank": measured, "activation_ratio_cp2_cp1": ratio}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] in ("--worker", "--cp-worker"):
        (worker if sys.argv[1] == "--worker" else context_parallel_worker)(json.loads(sys.argv[2]))
        return
    args = parse_args(
        "packing",
        __doc__.splitlines()[0],
        extra=lambda p: (
            p.add_argument("--model", default="tiny", help="model preset"),
            p.add_argument("--rows", type=int, default=64, help="rollout rows per update"),
            p.add_argument("--width", type=int, default=256, help="the longest row allowed (max_total_tokens)"),
            p.add_argument("--micro-batch-size", type=int, default=16),
            p.add_argument("--iters", type=int, default=5, help="timed updates per setting (median kept)"),
            p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)"),
            p.add_argument("--cp-tokens", type=int, default=2048, help="row length of the CP memory measurement"),
        ),
    )
    rows = 16 if args.quick else args.rows
    iters = 2 if args.quick else args.iters
    lengths = gsm8k_lengths(rows, args.width)
    spec = {
        "model": args.model,
        "rows": rows,
        "width": args.width,
        "micro_batch_size": min(args.micro_batch_size, rows),
        "iters": iters,
        "threads": args.threads,
        "lengths": lengths,
    }
    load_before = os.getloadavg()[0]
    measured = _torchrun(1, "--worker", spec)
    speedup = measured["packed"]["useful_tokens_per_s"] / measured["padded"]["useful_tokens_per_s"]
    table = [{"setting": k, **v} for k, v in measured.items()]
    print_table(table)
    print(f"packing speed-up (useful tokens/s): {speedup:.2f}x; padding in the batch: "
          f"{1 - sum(lengths) / (rows * max(lengths)):.0%}")  # fmt: skip
    memory = context_parallel_memory(args.model, 512 if args.quick else args.cp_tokens, 1)
    mib = 2**20
    rows_cp = [
        {
            "setting": k,
            "activation_MiB_per_rank": v["activation_bytes"] / mib,
            "peak_rss_MiB": v["peak_rss_growth"] / mib,
        }
        for k, v in memory["per_rank"].items()
    ]
    print_table(rows_cp)
    print(f"context parallelism: activations per rank at CP 2 / CP 1 = {memory['activation_ratio_cp2_cp1']:.2f} "
          f"({memory['tokens']} tokens, one row)")  # fmt: skip
    write_result(
        args.out,
        {
            "quick": args.quick,
            "model": args.model,
            "rows": rows,
            "width": args.width,
            "micro_batch_size": spec["micro_batch_size"],
            "mean_length": sum(lengths) / rows,
            "lengths_source": "GSM8K train, (question + answer characters) / 4, clipped to [32, width]",
            "settings": measured,
            "packing_speedup": speedup,
            "context_parallel_memory": memory,
            "load_average_before": load_before,
        },
    )


if __name__ == "__main__":
    main()
