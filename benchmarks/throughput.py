"""Forward+backward training throughput (tokens/s) of megatron GPT models at TP=1 vs TP=2.

Each (model, TP) point runs in fresh processes through the real launcher (``torchrun``
with TP processes; threads per process = cores / processes, so both points use the whole
machine): build the model, wrap it in DDP + optimizer (``make_trainable``), warm up, then
time ``iters`` forward+backward passes of ``micro_batches x micro_batch_size x seq_len``
random tokens through megatron's schedule. No optimizer step (it does not scale with
tokens). On GPU (``--gpu``) the default model is ``llama_1b`` in bf16 and the result adds
MFU against a *measured* dense bf16 matmul peak of the same device.

Results are recorded in ``benchmarks/results/throughput.json``. Run from the repository root:

    python -m benchmarks.throughput [--quick]          # CPU: tiny and small_100m, TP 1 and 2
                                                      # (--quick: short sequences, one timed pass for 100M)
    python -m benchmarks.throughput --gpu --tp 1 2     # GPU: llama_1b, MFU
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
# model -> (vocab for presets without one, seq_len, micro_batch_size, micro_batches, iters) for full / quick
SHAPES = {
    "tiny": {"full": (8192, 256, 2, 2, 4), "quick": (8192, 64, 2, 2, 2)},
    "small_100m": {"full": (16384, 256, 1, 2, 3), "quick": (16384, 64, 1, 1, 1)},
    "llama_1b": {"full": (32000, 2048, 2, 4, 10), "quick": (32000, 1024, 1, 2, 3)},
}


def train_flops_per_token(model_cfg, seq_len: int) -> float:
    """Model FLOPs per trained token, forward + backward: 6 N + 12 L h s.

    N counts the parameters that take part in matmuls (every weight except the input
    embedding lookup; a tied output layer still multiplies); 12 L h s is the attention
    score and value matmuls (QK^T and AV, 2 x 2 L h s forward, x3 with backward), as in
    Kaplan et al. 2020 (Sec. 2.1) and PaLM (Chowdhery et al. 2022, App. B).
    """
    n = model_cfg.num_parameters()
    if not model_cfg.tie_word_embeddings:
        n -= model_cfg.vocab_size * model_cfg.hidden_size
    return 6.0 * n + 12.0 * model_cfg.num_layers * model_cfg.hidden_size * seq_len


def measured_matmul_peak(dtype_name: str = "bfloat16", size: int = 8192, reps: int = 20) -> float:
    """Achieved FLOP/s of a large square matmul on this process's device (the MFU denominator)."""
    import torch

    from carft_nemo.distributed import device

    dev, dtype = device.local_device(), getattr(torch, dtype_name)
    a, b = torch.randn(size, size, device=dev, dtype=dtype), torch.randn(size, size, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    device.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    device.synchronize()
    return 2.0 * size**3 * reps / (time.perf_counter() - start)


def worker(model: str, tp: int, shape: tuple, result_path: str, threads: int = 0) -> None:
    """One (model, TP) measurement in this launched process group; rank 0 writes the JSON."""
    import torch

    from carft_nemo.distributed import device
    from carft_nemo.distributed.layout import ParallelConfig, ProcessInfo, initialize, shutdown
    from carft_nemo.models.config import ModelConfig

    process = ProcessInfo.from_env()
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // process.world_size))
    vocab, seq, mbs, n_micro, iters = shape
    cfg = ModelConfig(preset=model)
    cfg = cfg.with_vocab(cfg.vocab_size or vocab)
    parallel = ParallelConfig(tensor_parallel=tp)
    layout = initialize(
        parallel,
        process=process,
        num_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
    )
    from carft_nemo.models.gpt import build_gpt_model
    from carft_nemo.models.step import forward_backward, lm_loss
    from carft_nemo.training.optim import OptimConfig, make_trainable

    trainable = make_trainable(build_gpt_model(cfg, parallel), cfg, parallel, OptimConfig(), total_steps=1)
    gen = torch.Generator().manual_seed(0)
    batches = [
        {
            k: torch.randint(0, cfg.vocab_size, (mbs, seq), generator=gen).to(device.local_device())
            for k in ("tokens", "labels")
        }
        for _ in range(n_micro)
    ]
    loss_fn = lm_loss()
    times = []
    for i in range(iters + 1):  # the first pass warms up allocators and kernels
        trainable.zero_grad()
        torch.distributed.barrier()
        device.synchronize()
        start = time.perf_counter()
        forward_backward(trainable.model, batches, loss_fn)
        device.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    tokens = n_micro * mbs * seq * layout.data_parallel
    # the slowest rank sets the pace
    step = torch.tensor([sum(times) / len(times)], dtype=torch.float64, device=device.local_device())
    torch.distributed.all_reduce(step, op=torch.distributed.ReduceOp.MAX)
    step_s = float(step)
    record = {
        "model": model,
        "tp": tp,
        "processes": layout.world_size,
        "params": cfg.num_parameters(),
        "seq_len": seq,
        "tokens_per_iter": tokens,
        "iters": iters,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "threads_per_process": torch.get_num_threads(),
        "device": device.accelerator_name(),
        "dtype": str(device.default_dtype(cfg.bf16)).replace("torch.", ""),
    }
    if device.has_cuda():
        peak = measured_matmul_peak()
        achieved = train_flops_per_token(cfg, seq) * tokens / step_s
        record.update(
            peak_matmul_tflops_per_gpu=peak / 1e12,
            model_tflops_per_gpu=achieved / layout.world_size / 1e12,
            mfu=achieved / (peak * layout.world_size),
        )
    if layout.is_logging_rank:
        Path(result_path).write_text(json.dumps(record))
    shutdown()


def launch(model: str, tp: int, shape: tuple, timeout: float, threads: int = 0) -> dict:
    """Run :func:`worker` under torchrun with ``tp`` processes on this host."""
    from carft_nemo.distributed.layout import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            str(Path(sys.executable).with_name("torchrun")),
            "--nproc-per-node",
            str(tp),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            __file__,
            "--worker",
            json.dumps({"model": model, "tp": tp, "shape": list(shape), "result_path": str(out), "threads": threads}),
        ]
        env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{model} TP={tp} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        spec = json.loads(sys.argv[2])
        worker(spec["model"], spec["tp"], tuple(spec["shape"]), spec["result_path"], spec.get("threads", 0))
        return
    args = parse_args(
        "throughput",
        __doc__.splitlines()[0],
        extra=lambda p: (
            p.add_argument(
                "--models", nargs="+", default=None, help="presets (default: tiny small_100m; llama_1b with --gpu)"
            ),
            p.add_argument("--tp", nargs="+", type=int, default=[1, 2], help="tensor-parallel sizes"),
            p.add_argument("--gpu", action="store_true", help="GPU run with MFU (skipped without CUDA)"),
            p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores / processes)"),
            p.add_argument("--timeout", type=float, default=1800, help="seconds per measurement"),
        ),
    )
    import torch

    if args.gpu and not torch.cuda.is_available():
        print("throughput: --gpu given but no CUDA device is visible; skipping the GPU benchmark")
        return
    models = args.models or (["llama_1b"] if args.gpu else ["tiny", "small_100m"])
    load_before = os.getloadavg()[0]  # other jobs on the host skew CPU numbers: record it
    rows = []
    for model in models:
        shape = SHAPES.get(model, SHAPES["tiny"])["quick" if args.quick else "full"]
        for tp in args.tp:
            rec = launch(model, tp, shape, args.timeout, args.threads)
            rows.append(rec)
            print(f"{model} TP={tp}: {rec['tokens_per_s']:.1f} tokens/s", flush=True)
    table = [
        {
            "model": r["model"],
            "tp": r["tp"],
            "procs": r["processes"],
            "params_M": r["params"] / 1e6,
            "seq": r["seq_len"],
            "tok/iter": r["tokens_per_iter"],
            "step_s": r["step_s"],
            "tokens/s": r["tokens_per_s"],
            **({"mfu": r["mfu"]} if "mfu" in r else {}),
        }
        for r in rows
    ]
    print_table(table)
    tokens_per_s = {m: {f"tp{r['tp']}": r["tokens_per_s"] for r in rows if r["model"] == m} for m in models}
    path = write_result(
        args.out,
        {
            "benchmark": "throughput",
            "quick": args.quick,
            "tokens_per_s": tokens_per_s,
            "runs": rows,
            "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
            "note": "forward+backward only; threads per process = cores / processes; "
            "CPU numbers are fp32 on a shared 2-core machine",
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
