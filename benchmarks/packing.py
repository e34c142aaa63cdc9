"""Sequence packing: useful tokens/s of the PPO training phase with and without packing.

One process (torchrun, gloo), the actor's real PPO loss through megatron's schedule and
Adam, on a rollout batch whose lengths follow GSM8K's spread (question + annotated answer,
tokens taken as characters / 4, clipped to [32, width]): the same rows, micro-batches and
epochs with ``packing`` off (every row padded to the batch's longest row, as a rollout's
tensors are) and on (each micro-batch's rows in first-fit-decreasing bins of that width).
Useful tokens are the rows' real tokens; both runs do the same optimizer steps on the same
data, so the ratio of their tokens/s is the packing speed-up. Results in
``benchmarks/results/packing.json``:

    python -m benchmarks.packing [--quick] [--model tiny] [--rows 64] [--width 256]
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


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
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
        ),
    )
    from carft_nemo.distributed.layout import free_port

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
    with tempfile.TemporaryDirectory() as tmp:
        spec["result_path"] = str(Path(tmp) / "result.json")
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "1", "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), __file__, "--worker", json.dumps(spec)]  # fmt: skip
        env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"packing benchmark failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        measured = json.loads(Path(spec["result_path"]).read_text())
    speedup = measured["packed"]["useful_tokens_per_s"] / measured["padded"]["useful_tokens_per_s"]
    table = [{"setting": k, **v} for k, v in measured.items()]
    print_table(table)
    print(f"packing speed-up (useful tokens/s): {speedup:.2f}x; padding in the batch: "
          f"{1 - sum(lengths) / (rows * max(lengths)):.0%}")  # fmt: skip
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
            "load_average_before": load_before,
        },
    )


if __name__ == "__main__":
    main()
