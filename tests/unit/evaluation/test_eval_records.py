"""Evaluation files on disk: a run's later evaluations are compared with its ``before`` one."""

import json
from pathlib import Path

import pytest

from carft_nemo.evaluation.metrics import sign_test_p
from carft_nemo.evaluation.runner import (
    EvalResult,
    baseline_accuracy,
    read_correctness,
    record_eval,
    write_eval_outputs,
)
from carft_nemo.telemetry.run_log import RunLogger, read_metrics


def _result(correct: list[bool]) -> EvalResult:
    records = [
        {
            "id": f"q{i}",
            "gold": 1.0,
            "prediction": 1.0 if ok else 2.0,
            "correct": ok,
            "response_tokens": 3,
            "finished": True,
            "completion": "...",
        }
        for i, ok in enumerate(correct)
    ]
    return EvalResult(sum(correct) / len(correct), None, len(correct), 3.0, records)


def test_record_eval_logs_flips_since_before(tmp_path: Path) -> None:
    logger = RunLogger(tmp_path, "reft", enabled=True, total_steps=2, tensorboard=False, progress=False)
    eval_dir = tmp_path / "eval"
    before = _result([True, True, False, False, True, False])
    after = _result([True, False, True, True, True, True])  # q1 broken; q2, q3, q5 fixed
    assert record_eval(before, eval_dir, "before", 0, logger, 1.5) is None
    change = record_eval(after, eval_dir, "final", 2, logger, 2.5)
    logger.close()
    assert (change.compared, change.fixed, change.broken) == (6, 3, 1)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert "eval_fixed" not in rows[0] and rows[0]["eval_accuracy"] == pytest.approx(0.5)
    assert (rows[1]["eval_fixed"], rows[1]["eval_broken"]) == (3, 1)
    assert rows[1]["eval_sign_test_p"] == pytest.approx(sign_test_p(3, 1))
    # what a resumed run reads back: the first start's baseline
    assert baseline_accuracy(eval_dir) == pytest.approx(0.5)
    assert read_correctness(eval_dir / "final_predictions.jsonl") == after.correctness()


def test_no_baseline_means_no_change(tmp_path: Path) -> None:
    logger = RunLogger(tmp_path, "sft", enabled=True, total_steps=1, tensorboard=False, progress=False)
    assert record_eval(_result([True, False]), tmp_path / "eval", "final", 1, logger, 0.1) is None
    logger.close()
    assert baseline_accuracy(tmp_path / "eval") is None
    assert "eval_fixed" not in read_metrics(tmp_path / "metrics.jsonl")[0]


def test_read_correctness_names_file_and_line(tmp_path: Path) -> None:
    write_eval_outputs(_result([True, False]), tmp_path, "x")
    path = tmp_path / "x_predictions.jsonl"
    path.write_text(path.read_text() + json.dumps({"id": "q9"}) + "\n")
    with pytest.raises(ValueError, match=r"x_predictions.jsonl:3: .*'correct'"):
        read_correctness(path)
