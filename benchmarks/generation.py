"""Generation throughput (new tokens/s) of MegatronGenerator vs transformers' ``generate``.

For each model (``tiny``, ``small_100m``) one process builds the megatron GPT (TP=1), exports
it with :func:`carft_nemo.checkpoint.hf_io.export_hf`, loads the folder with
``AutoModelForCausalLM`` (same weights, fp32 on CPU, default SDPA attention, ``use_cache``)
and times greedy generation of the same prompts of different lengths with both (ours
right-pads, HF left-pads as decoder-only batches need). Every sequence generates exactly
``new_tokens`` (no EOS on either side), so tokens/s = batch x new_tokens / seconds.

HF runs at 1 and at torch's thread count (2 here); ours at its default
``GenerationConfig.cpu_threads=1`` (also at 2 with ``GEN_BENCH_OURS_ALL_THREADS=1``; on a
loaded host more threads can be slower than one for ours and HF alike, OpenMP threads
spinning on a descheduled partner), all variants alternating within each repetition so that
load changes hit them alike; each run records wall time and the process's CPU time
(``time.process_time``, summed over its threads). Best of ``reps`` per variant.

Headline: ``speedup_vs_hf_generate`` = HF's *best* wall time over its two thread settings
divided by ours at the default settings. ``speedup_vs_hf_generate_cpu`` is the same ratio of
CPU times, which is less sensitive to other processes on a shared host (the wall ratio is
what a user waits for; both are recorded, with the host's load average). Evidence that the
weights match: the largest logit difference of one full forward, and how many greedy
continuations agree.

Results are recorded in ``benchmarks/results/generation.json``. Run from the repository root:

    python -m benchmarks.generation [--quick]
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import parse_args, print_table, write_result

# model -> (vocab for presets without one, batch, shortest prompt, longest prompt, new tokens, reps)
SHAPES = {
    "tiny": {"full": (8192, 8, 16, 48, 64, 3), "quick": (8192, 4, 8, 16, 16, 1)},
    "small_100m": {"full": (16384, 8, 16, 48, 64, 2), "quick": (16384, 2, 8, 16, 8, 1)},
}


def _sync() -> None:
    from carft_nemo.distributed import device

    if device.has_cuda():
        import torch

        torch.cuda.synchronize()


def _prompts(n: int, lo: int, hi: int, vocab: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    lengths = torch.linspace(lo, hi, n).round().long().tolist()
    return [torch.randint(1, vocab, (length,), generator=g).tolist() for length in lengths]


def _hf_generate(hf, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """HF greedy generation of a left-padded batch (what HF needs for decoder-only batches)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    dev = next(hf.parameters()).device
    out = hf.generate(
        input_ids=ids.to(dev),
        attention_mask=mask.to(dev),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    return out[:, width:].tolist()


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds summed over threads) of one call."""
    _sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def _with_threads(n: int, fn):
    import torch

    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    return run


def measure(model_name: str, shape: tuple, workdir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from carft_nemo.checkpoint.hf_io import export_hf
    from carft_nemo.distributed import device
    from carft_nemo.distributed.layout import ParallelConfig, initialize
    from carft_nemo.generation import GenerationConfig, MegatronGenerator
    from carft_nemo.models.config import ModelConfig
    from carft_nemo.models.forward import causal_inputs
    from carft_nemo.models.gpt import build_gpt_model

    vocab, batch, lo, hi, new_tokens, reps = shape
    cfg = ModelConfig(preset=model_name)
    cfg = cfg.with_vocab(cfg.vocab_size or vocab)
    parallel = ParallelConfig()
    initialize(
        parallel,
        num_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
    )
    model = build_gpt_model(cfg, parallel).eval()
    hf_dir = export_hf(model, cfg, workdir / model_name)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=next(model.parameters()).dtype)
    hf = hf.to(device.local_device()).eval()

    prompts = _prompts(batch, lo, hi, cfg.vocab_size)
    with torch.no_grad():  # same weights: compare one full forward of the longest prompt
        tokens = torch.tensor([prompts[-1]], device=device.local_device())
        positions, mask = causal_inputs(tokens)
        ours = model(tokens, positions, mask)[..., : cfg.vocab_size].float()
        theirs = hf(tokens).logits.float()
        logit_diff = float((ours - theirs).abs().max())

    gen = MegatronGenerator(model, vocab_size=cfg.vocab_size)
    gcfg = GenerationConfig(max_new_tokens=new_tokens, greedy=True)  # default cpu_threads=1
    threads = torch.get_num_threads()
    variants = {  # name -> callable; ours_default is the shipped setting
        "ours_default": lambda: gen.generate(prompts, gcfg),
    }
    if os.environ.get("GEN_BENCH_OURS_ALL_THREADS"):  # ours at torch's thread count too (slow under load)
        variants[f"ours_threads{threads}"] = _with_threads(
            threads,
            lambda: gen.generate(prompts, GenerationConfig(max_new_tokens=new_tokens, greedy=True, cpu_threads=0)),
        )
    for n in sorted({1, threads}):
        variants[f"hf_threads{n}"] = _with_threads(n, lambda: _hf_generate(hf, prompts, new_tokens))
    ours_out = gen.generate(prompts, gcfg).responses  # also warms up both paths
    with torch.no_grad():
        hf_out = _hf_generate(hf, prompts, new_tokens)
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for _ in range(reps):  # alternate so background load affects every variant alike
            for name, fn in variants.items():
                runs[name].append(_timed(fn))
    best = {name: (min(w for w, _ in r), min(c for _, c in r)) for name, r in runs.items()}
    hf_wall = min(v[0] for k, v in best.items() if k.startswith("hf_"))
    hf_cpu = min(v[1] for k, v in best.items() if k.startswith("hf_"))
    ours_wall, ours_cpu = best["ours_default"]
    n_tokens = batch * new_tokens
    return {
        "model": model_name,
        "params": cfg.num_parameters(),
        "batch": batch,
        "prompt_lengths": f"{lo}-{hi}",
        "new_tokens": new_tokens,
        "reps": reps,
        "megatron_s": ours_wall,
        "megatron_cpu_s": ours_cpu,
        "hf_generate_s": hf_wall,
        "hf_generate_cpu_s": hf_cpu,
        "tokens_per_s": n_tokens / ours_wall,
        "hf_tokens_per_s": n_tokens / hf_wall,
        "speedup_vs_hf_generate": hf_wall / ours_wall,
        "speedup_vs_hf_generate_cpu": hf_cpu / ours_cpu,
        "variants": {
            name: {"wall_s": w, "cpu_s": c, "tokens_per_s": n_tokens / w, "runs": [list(r) for r in runs[name]]}
            for name, (w, c) in best.items()
        },
        "max_logit_diff": logit_diff,
        "greedy_agreement": sum(a == b for a, b in zip(ours_out, hf_out)) / batch,
        "threads": threads,
        "ours_cpu_threads": gcfg.cpu_threads,
        "load_avg_1m": os.getloadavg()[0],
        "device": str(device.local_device()),
    }


def main() -> None:
    args = parse_args(
        "generation",
        __doc__.splitlines()[0],
        extra=lambda p: p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES)),
    )
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from carft_nemo.distributed.layout import shutdown

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name in args.models:
                rows.append(measure(name, SHAPES[name]["quick" if args.quick else "full"], Path(tmp)))
        finally:
            shutdown()
    print_table(
        [
            {
                k: r[k]
                for k in (
                    "model",
                    "batch",
                    "new_tokens",
                    "tokens_per_s",
                    "hf_tokens_per_s",
                    "speedup_vs_hf_generate",
                    "speedup_vs_hf_generate_cpu",
                    "max_logit_diff",
                    "greedy_agreement",
                    "load_avg_1m",
                )
            }
            for r in rows
        ]
    )
    path = write_result(args.out, {"quick": args.quick, "models": {r["model"]: r for r in rows}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
