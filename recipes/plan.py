"""Memory plan of a run before launch: every role's per-GPU estimate, its peak and headroom.

    python recipes/plan.py configs/carft-qwen2.5-7b-instruct-gsm8k-ncot-1n8g-tp2.yaml
    python recipes/plan.py configs/long-context/*.yaml actor.micro_batch_size=2 --gpu-memory-gb 80
    python recipes/plan.py configs/*.yaml --model-preset tiny   # RL configs whose model is the checkpoint's

Each config (SFT, RL, a main job's or a study's stages) gets a table in GiB: weights, gradients,
optimizer states, activations, logits, the generation K/V cache, the peak and the headroom
against ``--gpu-memory-gb`` (default: the config's ``cluster.gpu_memory_gb``, else 80), and
whether it fits. Estimates assume GPUs with bf16 and Transformer Engine's fused attention
(carft_nemo/planning/memory.py has the terms). ``key=value`` overrides apply to every config.
The SFT world size comes from the file name (``-2n8g-``: 16 GPUs), else ``--world-size``.
Exit code 1 when a config does not fit, 2 on a bad config.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from carft_nemo.cli import guarded
from carft_nemo.config import load_config
from carft_nemo.models.config import ModelConfig
from carft_nemo.pipeline.main_job import MainConfig
from carft_nemo.planning.memory import GIB, Precision
from carft_nemo.planning.plan import plan_rl, plan_sft, render
from carft_nemo.rl.config import RLConfig
from carft_nemo.schemas import schema_for
from carft_nemo.sft.config import SFTConfig, planning_model

NODES_GPUS = re.compile(r"-(\d+)n(\d+)g-")


def _rl_model(cfg: RLConfig, fallback: ModelConfig | None) -> ModelConfig | None:
    """The RL run's model: its own, the SFT checkpoint's if it exists, else ``fallback``."""
    if not cfg.model.is_unset:
        return cfg.model
    try:
        from carft_nemo.rl.controller import resolve_sft

        return resolve_sft(cfg)[2]
    except Exception:  # noqa: BLE001 - no checkpoint here: the fallback, or a note
        return fallback


def _stages(cfg, world: int, fallback: ModelConfig | None, vocab: int) -> list[tuple[str, list | str]]:
    """(title, roles or a note) for each stage of a config."""
    if isinstance(cfg, SFTConfig):
        model = planning_model(cfg)
        return [("sft", plan_sft(cfg, model, Precision.gpu(model), world))]
    if isinstance(cfg, RLConfig):
        model = _rl_model(cfg, fallback)
        if model is None:
            return [("rl", "the model comes from sft_checkpoint, which is not here: pass --model-preset")]
        model = model if model.vocab_size else model.with_vocab(vocab)
        return [("rl", plan_rl(cfg, model, Precision.gpu(model)))]
    sft = planning_model(cfg.sft)
    stages = [("sft", plan_sft(cfg.sft, sft, Precision.gpu(sft), world))]
    rl_stages = {m: getattr(cfg, m) for m in cfg.methods} if isinstance(cfg, MainConfig) else {"rl": cfg.rl}
    for name, rl in rl_stages.items():
        model = rl.model if not rl.model.is_unset else sft
        stages.append((name, plan_rl(rl, model, Precision.gpu(model))))
    return stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("items", nargs="+", help="config files and key=value overrides")
    parser.add_argument("--gpu-memory-gb", type=float, default=0.0, help="GPU memory (default: cluster's, else 80)")
    parser.add_argument("--world-size", type=int, default=0, help="SFT ranks (default: from the file name, else 1)")
    parser.add_argument("--model-preset", default=None, help="model of RL configs that take it from the checkpoint")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary when neither model nor tokenizer says")
    args = parser.parse_args(argv)
    configs = [Path(i) for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    fallback = ModelConfig(preset=args.model_preset) if args.model_preset else None
    all_fit = True
    for path in configs:
        cfg = guarded(lambda path=path: load_config(schema_for(path), path, overrides))
        limit = args.gpu_memory_gb or getattr(getattr(cfg, "cluster", None), "gpu_memory_gb", 0.0) or 80.0
        match = NODES_GPUS.search(path.name)
        world = args.world_size or (int(match[1]) * int(match[2]) if match else 1)
        print(f"== {path} ({limit:g} GiB a GPU)")
        for title, roles in guarded(lambda cfg=cfg, world=world: _stages(cfg, world, fallback, args.vocab)):
            if isinstance(roles, str):
                print(f"{title}: skipped: {roles}")
                continue
            peak = max(r.peak for r in roles) / GIB
            fits = peak <= limit
            all_fit &= fits
            print(render(roles, limit))
            print(f"{title}: peak {peak:.2f} GiB a GPU: {'fits' if fits else 'DOES NOT FIT'} in {limit:g} GiB\n")
    return 0 if all_fit else 1


if __name__ == "__main__":
    sys.exit(main())
