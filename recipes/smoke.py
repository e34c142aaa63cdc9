"""Smoke run: build the ``tiny`` model, take a few optimizer steps on random tokens, print losses.

Checks that the platform works end to end on this machine (process group, megatron's
parallel state, model build, DDP + optimizer, the pipeline schedule) without data,
tokenizer or checkpoints::

    python recipes/smoke.py                                   # one process (CPU or GPU)
    torchrun --nproc-per-node 2 recipes/smoke.py --tp 2      # tensor parallel
    torchrun --nproc-per-node 2 recipes/smoke.py --pp 2      # pipeline parallel (1F1B)
    srun -n 2 python recipes/smoke.py --tp 2                  # under Slurm

The batch is fixed, so the loss must fall as the model memorises it; the last line is
``SMOKE_RESULT {json}`` for scripts and tests.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--preset", default="tiny", help="model preset (carft_nemo.models.config.PRESETS)")
    parser.add_argument("--vocab", type=int, default=512, help="made-up vocabulary size")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=1234)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # light imports first: a bad layout is reported before megatron is even imported
    from carft_nemo.config import ConfigError
    from carft_nemo.distributed.layout import ParallelConfig, ProcessInfo, initialize, shutdown, validate_layout
    from carft_nemo.models.config import ModelConfig

    try:
        model_cfg = ModelConfig(preset=args.preset).with_vocab(args.vocab)
        parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp)
        process = ProcessInfo.from_env()
        validate_layout(
            parallel,
            process.world_size,
            num_layers=model_cfg.num_layers,
            num_attention_heads=model_cfg.num_attention_heads,
            num_query_groups=model_cfg.num_query_groups,
        )
        layout = initialize(
            parallel,
            seed=args.seed,
            process=process,
            num_layers=model_cfg.num_layers,
            num_attention_heads=model_cfg.num_attention_heads,
            num_query_groups=model_cfg.num_query_groups,
        )
    except ConfigError as err:  # a user mistake: one line, no traceback
        print(f"smoke: {err}", file=sys.stderr)
        return 2
    from carft_nemo.distributed import device
    from carft_nemo.models.gpt import build_gpt_model
    from carft_nemo.models.step import forward_backward, lm_loss
    from carft_nemo.training.optim import OptimConfig, make_trainable

    try:
        gpt = build_gpt_model(model_cfg, parallel)
        trainable = make_trainable(
            gpt, model_cfg, parallel, OptimConfig(lr=args.lr, schedule="constant"), total_steps=args.steps
        )
        # same tokens on every rank (seeded generator); each data-parallel rank would see its own in training
        gen = torch.Generator().manual_seed(args.seed)
        batches = []
        for _ in range(args.micro_batches):
            seq = torch.randint(0, args.vocab, (args.micro_batch_size, args.seq_len + 1), generator=gen)
            batches.append(
                {"tokens": seq[:, :-1].to(device.local_device()), "labels": seq[:, 1:].to(device.local_device())}
            )
        losses = []
        for step in range(args.steps):
            start = time.perf_counter()
            trainable.zero_grad()
            metrics = forward_backward(trainable.model, batches, lm_loss())
            ok, grad_norm = trainable.step()
            loss = _last_stage_mean_loss(metrics, layout)
            losses.append(loss)
            if layout.is_logging_rank:
                print(
                    f"step {step}  loss {loss:.4f}  grad_norm {grad_norm:.3f}  applied {ok}  "
                    f"{time.perf_counter() - start:.2f}s",
                    flush=True,
                )
        if layout.is_logging_rank:
            result = {
                "losses": losses,
                "world_size": layout.world_size,
                "tp": layout.tensor_parallel,
                "pp": layout.pipeline_parallel,
                "dp": layout.data_parallel,
                "params_per_rank": sum(p.numel() for p in gpt.parameters()),
            }
            print("SMOKE_RESULT " + json.dumps(result), flush=True)
        finite = all(math.isfinite(x) for x in losses)
        return 0 if finite else 1
    finally:
        shutdown()


def _last_stage_mean_loss(metrics: list[dict[str, torch.Tensor]], layout) -> float:
    """Mean micro-batch loss, sent from the last pipeline stage to every stage (for rank-0 logging)."""
    from carft_nemo.distributed import device

    local = torch.stack([m["loss"] for m in metrics]).mean() if metrics else torch.zeros(())
    value = local.detach().to(device.local_device(), torch.float32).reshape(1)
    if layout.pipeline_parallel > 1:
        # only the last stage holds a non-zero value: a sum over the stage group broadcasts it
        torch.distributed.all_reduce(value, group=layout.group("pp"))
    return float(value)


if __name__ == "__main__":
    sys.exit(main())
