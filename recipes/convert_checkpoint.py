"""Convert between HF Llama/Qwen2 folders and carft-nemo's megatron distributed checkpoints.

    # HF folder -> megatron checkpoint laid out for TP=2, PP=2 (4 processes)
    torchrun --nproc-per-node 4 recipes/convert_checkpoint.py hf-to-megatron \\
        --hf /models/Qwen2.5-7B-Instruct --out /ckpt/qwen-init --tp 2 --pp 2

    # megatron checkpoint (any layout it was saved in) -> HF folder, in one process
    python recipes/convert_checkpoint.py megatron-to-hf --checkpoint /ckpt/run1 --out /export/run1

The megatron checkpoint stores weights with their global shapes, so it loads at any TP/PP
layout; ``--tp/--pp`` only choose how the conversion itself is parallelised (the product
must equal the number of processes). Exit code 2 and a one-line message for user errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from carft_nemo.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    to_mcore = sub.add_parser("hf-to-megatron", help="HF folder (config.json + *.safetensors) -> megatron checkpoint")
    to_mcore.add_argument("--hf", required=True, type=Path, help="HF model folder")
    to_mcore.add_argument("--out", required=True, type=Path, help="checkpoint root; writes <out>/step_<step>")
    to_mcore.add_argument("--step", type=int, default=0, help="step number recorded in the checkpoint (default 0)")
    to_mcore.add_argument(
        "--vocab-multiple",
        type=int,
        default=128,
        help="pad the vocabulary to a multiple of this times TP (megatron's make_vocab_size_divisible_by)",
    )
    to_hf = sub.add_parser("megatron-to-hf", help="megatron checkpoint -> HF folder that transformers loads")
    to_hf.add_argument(
        "--checkpoint", required=True, type=Path, help="a step_N folder, or a root (newest complete step)"
    )
    to_hf.add_argument("--out", required=True, type=Path, help="HF folder to write (replaced if it exists)")
    to_hf.add_argument("--tokenizer", type=Path, default=None, help="HF tokenizer folder to copy alongside")
    for p in (to_mcore, to_hf):
        p.add_argument("--tp", type=int, default=1, help="tensor-parallel size used for the conversion")
        p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size used for the conversion")
        p.add_argument("--model-name", default="policy", help="model group name inside the checkpoint")
    return parser


def _layout(model_cfg, tp: int, pp: int):
    """Check the layout against the model and the process count, then start the groups."""
    from carft_nemo.distributed.layout import ParallelConfig, ProcessInfo, initialize, validate_layout

    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    # model checks first (a TP that does not divide the heads), then the process count
    validate_layout(
        parallel,
        tp * pp,
        num_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
    )
    world = ProcessInfo.from_env().world_size
    if world != tp * pp:
        raise ConfigError(
            f"parallel: --tp {tp} x --pp {pp} = {tp * pp} processes needed, {world} started "
            f"(use torchrun --nproc-per-node {tp * pp})"
        )
    initialize(
        parallel,
        num_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
    )
    return parallel


def hf_to_megatron(args: argparse.Namespace) -> Path:
    from carft_nemo.checkpoint.dist_checkpoint import save_checkpoint
    from carft_nemo.checkpoint.hf_io import hf_model_config, import_hf
    from carft_nemo.models.gpt import build_gpt_model

    model_cfg = hf_model_config(args.hf, args.vocab_multiple)
    parallel = _layout(model_cfg, args.tp, args.pp)
    model = build_gpt_model(model_cfg, parallel)
    import_hf(model, args.hf, model_cfg)
    return save_checkpoint(
        args.out,
        args.step,
        {args.model_name: model},
        metadata={"model": dataclasses.asdict(model_cfg), "source": str(args.hf)},
    )


def megatron_to_hf(args: argparse.Namespace) -> Path | None:
    from carft_nemo.checkpoint.dist_checkpoint import (
        CheckpointError,
        load_checkpoint,
        read_metadata,
        resolve_checkpoint,
    )
    from carft_nemo.checkpoint.hf_io import export_hf
    from carft_nemo.models.config import ModelConfig
    from carft_nemo.models.gpt import build_gpt_model

    path = resolve_checkpoint(args.checkpoint)
    stored = read_metadata(path).get("metadata", {}).get("model")
    if not stored:
        raise CheckpointError(f"checkpoint {path}: its checkpoint.json has no metadata.model (model config)")
    model_cfg = ModelConfig(**stored)
    parallel = _layout(model_cfg, args.tp, args.pp)
    model = build_gpt_model(model_cfg, parallel)
    load_checkpoint(path, {args.model_name: model}, load_optimizer=False, load_rng=False)
    tokenizer = None
    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    return export_hf(model, model_cfg, args.out, tokenizer=tokenizer)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from carft_nemo.checkpoint.dist_checkpoint import CheckpointError

    try:
        out = hf_to_megatron(args) if args.command == "hf-to-megatron" else megatron_to_hf(args)
    except (ConfigError, CheckpointError) as err:
        print(f"convert_checkpoint: error: {err}", file=sys.stderr)
        return 2
    finally:
        from carft_nemo.distributed.layout import shutdown

        shutdown()
    if out is not None:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
