"""The evaluation recipe: a trained checkpoint on a test split -> predictions + summary.

The model architecture is read from the checkpoint's metadata (written by the training
recipes), so a user names only the checkpoint, the data and the sampling settings.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carft_nemo.checkpoint.dist_checkpoint import CheckpointError, load_checkpoint, read_metadata, resolve_checkpoint
from carft_nemo.config import require, save_resolved
from carft_nemo.data.datasets import DatasetConfig, held_out_split, load_examples
from carft_nemo.data.tokenization import EncodingConfig, encode_prompts, load_tokenizer
from carft_nemo.distributed import layout as parallel_layout
from carft_nemo.evaluation.metrics import paired_change
from carft_nemo.evaluation.runner import evaluate, read_correctness, write_eval_outputs
from carft_nemo.generation.config import GenerationConfig
from carft_nemo.generation.megatron import MegatronGenerator
from carft_nemo.models.config import ModelConfig
from carft_nemo.models.gpt import build_gpt_model
from carft_nemo.telemetry.run_log import LOG, setup_logging


@dataclass
class EvalConfig:
    checkpoint: str = ""  # a step_N folder, or a checkpoints folder (newest complete one is used)
    tokenizer: str | None = None  # default: <checkpoint root>/../tokenizer (where SFT writes it)
    output_dir: str = "outputs/eval"
    name: str = "eval"  # file prefix of the outputs
    parallel: parallel_layout.ParallelConfig = field(default_factory=parallel_layout.ParallelConfig)
    data: DatasetConfig = field(default_factory=held_out_split)
    encoding: EncodingConfig = field(default_factory=EncodingConfig)
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(max_new_tokens=256, greedy=True, micro_batch_size=64)
    )
    vote_k: int = 1  # > 1 adds majority-vote accuracy over k samples
    vote_temperature: float = 0.7
    # Another evaluation's *_predictions.jsonl on the same questions (e.g. the SFT checkpoint's):
    # adds how many answers this checkpoint fixed and broke, and McNemar's exact test on them.
    compare_to: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.vote_k >= 1, "vote_k", f"must be >= 1, got {self.vote_k}")
        require(self.vote_temperature > 0, "vote_temperature", "must be > 0")
        require(
            self.compare_to is None or Path(self.compare_to).is_file(),
            "compare_to",
            f"no predictions file at {self.compare_to}",
        )


def _tokenizer_path(cfg: EvalConfig, ckpt: Path) -> Path:
    if cfg.tokenizer:
        return Path(cfg.tokenizer)
    guess = ckpt.parent.parent / "tokenizer"
    require(guess.is_dir(), "tokenizer", f"not set and no tokenizer folder at {guess}; pass tokenizer=PATH")
    return guess


def run_evaluation(cfg: EvalConfig) -> dict[str, Any]:
    require(bool(cfg.checkpoint), "checkpoint", "must name a checkpoint folder")
    try:
        ckpt = resolve_checkpoint(cfg.checkpoint)
        meta = read_metadata(ckpt)
    except CheckpointError as err:
        require(False, "checkpoint", str(err))
    model_meta = meta.get("metadata", {}).get("model")
    require(isinstance(model_meta, dict), "checkpoint", f"{ckpt} has no model architecture in its metadata")
    model_cfg = ModelConfig(**model_meta)
    parallel_layout.check_model_layout(cfg.parallel, parallel_layout.current_world_size(), model_cfg)
    layout = parallel_layout.initialize(cfg.parallel, seed=cfg.seed, num_layers=model_cfg.num_layers)
    setup_logging(layout.is_logging_rank)
    tokenizer = load_tokenizer(_tokenizer_path(cfg, ckpt))
    require(
        len(tokenizer) <= model_cfg.padded_vocab_size(cfg.parallel.tensor_parallel),
        "tokenizer",
        f"has {len(tokenizer)} tokens, more than the checkpoint's model ({model_cfg.vocab_size})",
    )
    gpt = build_gpt_model(model_cfg, cfg.parallel)
    load_checkpoint(ckpt, {"policy": gpt}, load_optimizer=False, load_rng=False)
    reference = None  # read before the generation, so a bad file fails fast
    if cfg.compare_to:
        try:
            reference = read_correctness(cfg.compare_to)
        except ValueError as err:
            require(False, "compare_to", str(err))
    examples = load_examples(cfg.data)
    prompts, _, stats = encode_prompts(examples, tokenizer, cfg.encoding)
    require(stats.dropped == 0, "encoding.long_prompts", f"{stats.dropped} prompts were dropped as too long")
    gen_cfg = dataclasses.replace(
        cfg.generation, eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id, seed=cfg.seed
    )
    generator = MegatronGenerator(gpt, vocab_size=len(tokenizer))
    result = evaluate(
        generator, tokenizer, examples, prompts, gen_cfg, vote_k=cfg.vote_k, vote_temperature=cfg.vote_temperature
    )
    summary = {**result.summary(), "checkpoint": str(ckpt), "data": cfg.data.name, "split": cfg.data.split}
    if reference is not None:
        try:
            change = paired_change(reference, result.correctness())
        except ValueError as err:
            require(False, "compare_to", str(err))
        summary["change"] = {"against": cfg.compare_to, **change.as_dict()}
    if layout.is_logging_rank:
        out = Path(cfg.output_dir)
        write_eval_outputs(result, out, cfg.name)
        (out / f"{cfg.name}_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        save_resolved(cfg, out / f"{cfg.name}_config.yaml")
    LOG.info(
        "accuracy %.4f on %d examples%s",
        result.accuracy,
        result.num_examples,
        f", vote@{cfg.vote_k} {result.vote_accuracy:.4f}" if result.vote_accuracy is not None else "",
    )
    if "change" in summary:
        change = summary["change"]
        LOG.info(
            "against %s: %d fixed, %d broken on %d shared questions, sign test p=%.2g",
            cfg.compare_to,
            change["fixed"],
            change["broken"],
            change["compared"],
            change["sign_test_p"],
        )
    return summary
