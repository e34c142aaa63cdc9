"""Evaluate a policy on a split: greedy accuracy (and vote@k), with per-example predictions.

Every rank of the job calls :func:`evaluate`; data-parallel replicas each generate a
contiguous share of the questions and the results are gathered, so evaluation speeds up
with data parallelism and every rank returns the same summary.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch.distributed as dist

from carft_nemo.data.records import Example
from carft_nemo.distributed import axes
from carft_nemo.evaluation.metrics import (
    PairedChange,
    greedy_accuracy,
    majority_vote,
    majority_vote_accuracy,
    paired_change,
)
from carft_nemo.generation.config import GenerationConfig
from carft_nemo.generation.interface import Generator
from carft_nemo.rewards.correctness import score_batch
from carft_nemo.telemetry.run_log import LOG, RunLogger


@dataclass
class EvalResult:
    accuracy: float  # greedy
    vote_accuracy: float | None  # majority vote over k samples (None when k == 1)
    num_examples: int
    mean_response_tokens: float
    records: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "vote_accuracy": self.vote_accuracy,
            "num_examples": self.num_examples,
            "mean_response_tokens": self.mean_response_tokens,
        }

    def correctness(self) -> dict[str, bool]:
        """Example id -> greedy answer correct (the input of :func:`~carft_nemo.evaluation.metrics.paired_change`)."""
        return {str(r["id"]): bool(r["correct"]) for r in self.records}


def _dp() -> tuple[int, int, Any]:
    """Generation's replicas: data x context parallel (context-parallel ranks hold full weights)."""
    if axes.initialized():
        return axes.rank("dp_cp"), axes.size("dp_cp"), axes.group("dp_cp")
    return 0, 1, None


def _gather(items: list[Any]) -> list[Any]:
    rank, size, group = _dp()
    if size == 1:
        return items
    gathered: list[list[Any]] = [[] for _ in range(size)]
    dist.all_gather_object(gathered, items, group=group)
    return [x for part in gathered for x in part]


def evaluate(
    generator: Generator,
    tokenizer: Any,
    examples: Sequence[Example],
    prompts: Sequence[list[int]],
    gen_cfg: GenerationConfig,
    *,
    vote_k: int = 1,
    vote_temperature: float = 0.7,
) -> EvalResult:
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
            local.append(
                {
                    "id": examples[i].id,
                    "gold": examples[i].answer,
                    "prediction": scores[j].value,
                    "correct": scores[j].correct,
                    "response_tokens": len(greedy.responses[j]),
                    "finished": greedy.finished[j],
                    "completion": texts[j],
                }
            )
        if vote_k > 1:
            sampled_cfg = replace(gen_cfg, greedy=False, temperature=vote_temperature)
            repeated = [list(prompts[i]) for i in mine for _ in range(vote_k)]
            sampled = generator.generate(repeated, sampled_cfg)
            s_texts = tokenizer.batch_decode(sampled.responses, skip_special_tokens=True)
            s_scores = score_batch(s_texts, [examples[i] for i in mine for _ in range(vote_k)])
            for j in range(len(mine)):
                values = [s.value for s in s_scores[j * vote_k : (j + 1) * vote_k]]
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


def read_correctness(predictions_path: str | Path) -> dict[str, bool]:
    """Example id -> correct, from a ``*_predictions.jsonl`` that :func:`write_eval_outputs` wrote."""
    path = Path(predictions_path)
    correct: dict[str, bool] = {}
    with path.open() as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                correct[str(record["id"])] = bool(record["correct"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{line_no}: not a prediction record with 'id' and 'correct' ({err})") from err
    return correct


BASELINE = "before"  # the evaluation a training run makes before its first step


def change_since_baseline(result: EvalResult, eval_dir: str | Path) -> PairedChange | None:
    """Flips of ``result`` against the run's ``before`` evaluation in ``eval_dir`` (None if there is none).

    Read from disk, so a resumed run still compares with the evaluation of its first start.
    """
    path = Path(eval_dir) / f"{BASELINE}_predictions.jsonl"
    if not path.is_file():
        return None
    return paired_change(read_correctness(path), result.correctness())


def baseline_accuracy(eval_dir: str | Path) -> float | None:
    """Greedy accuracy of the run's ``before`` evaluation, if it was written."""
    path = Path(eval_dir) / f"{BASELINE}_summary.json"
    return json.loads(path.read_text()).get("accuracy") if path.is_file() else None


def held_out_summary(
    final: tuple[EvalResult, PairedChange | None] | None, eval_dir: str | Path, *, is_logging_rank: bool = True
) -> dict[str, Any]:
    """A stage summary's held-out fields: accuracy before (the run's first evaluation) and after, flips."""
    after, change = final if final is not None else (None, None)
    return {
        "accuracy_before": baseline_accuracy(eval_dir) if is_logging_rank else None,
        "accuracy_after": after.accuracy if after else None,
        "held_out_change": change.as_dict() if change else None,
    }


def record_eval(
    result: EvalResult,
    eval_dir: str | Path,
    name: str,
    step: int,
    logger: RunLogger,
    elapsed_s: float,
    *,
    is_logging_rank: bool = True,
) -> PairedChange | None:
    """Write ``result``'s files (logging rank), log its metrics and a line; returns its flips since ``before``."""
    change = None
    if is_logging_rank:
        write_eval_outputs(result, eval_dir, name)
        change = None if name == BASELINE else change_since_baseline(result, eval_dir)
    metrics: dict[str, float] = {
        "eval_accuracy": result.accuracy,
        "eval_response_tokens": result.mean_response_tokens,
        "eval_time_s": elapsed_s,
    }
    if change is not None:
        metrics.update(eval_fixed=change.fixed, eval_broken=change.broken, eval_sign_test_p=change.p_value)
    logger.log(step, metrics)
    flips = (
        f"; since {BASELINE}: {change.fixed} fixed, {change.broken} broken, sign test p={change.p_value:.2g}"
        if change is not None
        else ""
    )
    LOG.info(
        "eval %s @ step %d: accuracy %.3f on %d questions%s", name, step, result.accuracy, result.num_examples, flips
    )
    return change
