"""Evaluate a policy on a split: greedy accuracy (and vote@k), with per-example predictions.

Every rank of the job calls :func:`evaluate`; data-parallel replicas each generate a
contiguous share of the questions and the results are gathered, so evaluation speeds up
with data parallelism and every rank returns the same summary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch.distributed as dist
from megatron.core import parallel_state as ps

from carft_nemo.data.records import Example
from carft_nemo.evaluation.metrics import greedy_accuracy, majority_vote, majority_vote_accuracy
from carft_nemo.generation.config import GenerationConfig
from carft_nemo.generation.interface import Generator
from carft_nemo.rewards.correctness import score_batch


@dataclass
class EvalResult:
    accuracy: float  # greedy
    vote_accuracy: float | None  # majority vote over k samples (None when k == 1)
    num_examples: int
    mean_response_tokens: float
    records: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "vote_accuracy": self.vote_accuracy,
                "num_examples": self.num_examples, "mean_response_tokens": self.mean_response_tokens}


def _dp() -> tuple[int, int, Any]:
    if ps.model_parallel_is_initialized():
        return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), ps.get_data_parallel_group()
    return 0, 1, None


def _gather(items: list[Any]) -> list[Any]:
    rank, size, group = _dp()
    if size == 1:
        return items
    gathered: list[list[Any]] = [[] for _ in range(size)]
    dist.all_gather_object(gathered, items, group=group)
    return [x for part in gathered for x in part]


def evaluate(generator: Generator, tokenizer: Any, examples: Sequence[Example], prompts: Sequence[list[int]],
             gen_cfg: GenerationConfig, *, vote_k: int = 1, vote_temperature: float = 0.7) -> EvalResult:
    """Greedy accuracy on ``examples`` (``prompts[i]`` are their token ids); vote@k if ``vote_k`` > 1."""
    rank, size, _ = _dp()
    share = -(-len(examples) // size)
    lo, hi = rank * share, min(len(examples), (rank + 1) * share)
    mine = list(range(lo, hi))
    local: list[dict[str, Any]] = []
    if mine:
        greedy = generator.generate([list(prompts[i]) for i in mine], replace(gen_cfg, greedy=True))
        texts = tokenizer.batch_decode(greedy.responses, skip_special_tokens=True)
        scores = score_batch(texts, [examples[i] for i in mine])
        for j, i in enumerate(mine):
            local.append({"id": examples[i].id, "gold": examples[i].answer, "prediction": scores[j].value,
                          "correct": scores[j].correct, "response_tokens": len(greedy.responses[j]),
                          "finished": greedy.finished[j], "completion": texts[j]})
        if vote_k > 1:
            sampled_cfg = replace(gen_cfg, greedy=False, temperature=vote_temperature)
            repeated = [list(prompts[i]) for i in mine for _ in range(vote_k)]
            sampled = generator.generate(repeated, sampled_cfg)
            s_texts = tokenizer.batch_decode(sampled.responses, skip_special_tokens=True)
            s_scores = score_batch(s_texts, [examples[i] for i in mine for _ in range(vote_k)])
            for j in range(len(mine)):
                values = [s.value for s in s_scores[j * vote_k:(j + 1) * vote_k]]
                local[j]["votes"] = values
                local[j]["vote_prediction"] = majority_vote(values)
    records = _gather(local)
    golds = [r["gold"] for r in records]
    acc = greedy_accuracy([r["prediction"] for r in records], golds)
    vote_acc = majority_vote_accuracy([r["votes"] for r in records], golds) if vote_k > 1 else None
    mean_len = sum(r["response_tokens"] for r in records) / max(len(records), 1)
    return EvalResult(acc, vote_acc, len(records), mean_len, records)


def write_eval_outputs(result: EvalResult, out_dir: str | Path, name: str) -> None:
    """``<name>_predictions.jsonl`` (one line per example) and ``<name>_summary.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{name}_predictions.jsonl").open("w") as fh:
        for rec in result.records:
            fh.write(json.dumps(rec) + "\n")
    (out / f"{name}_summary.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
