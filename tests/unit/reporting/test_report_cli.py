"""recipes/report.py: a report drawn from run folders (side-by-side runs, or a main job's stages)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from carft_nemo.evaluation.metrics import sign_test_p
from carft_nemo.telemetry.run_log import RunLogger

ROOT = Path(__file__).resolve().parents[3]
PNG = b"\x89PNG\r\n\x1a\n"


def _run_dir(folder: Path, stage: str, rewards: list[float], change: dict | None) -> Path:
    logger = RunLogger(folder, stage, enabled=True, total_steps=len(rewards), tensorboard=False, progress=False)
    logger.log(0, {"eval_accuracy": 0.5})
    for step, reward in enumerate(rewards, 1):
        logger.log(step, {"reward": reward})
    logger.log(len(rewards), {"eval_accuracy": 0.75})
    logger.close()
    (folder / "summary.json").write_text(
        json.dumps({"accuracy_before": 0.5, "accuracy_after": 0.75, "held_out_change": change, "steps": len(rewards)})
    )
    return folder


def _report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "report.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_side_by_side_runs(tmp_path: Path) -> None:
    change = {"compared": 8, "fixed": 3, "broken": 1, "sign_test_p": sign_test_p(3, 1)}
    a = _run_dir(tmp_path / "a", "reft", [0.2, 0.4, 0.6], change)
    b = _run_dir(tmp_path / "b", "reft", [0.3, 0.3, 0.3], None)
    run = _report("--out", str(tmp_path / "rep"), "--title", "two runs", f"tp1={a}", f"tp2={b}")
    assert run.returncode == 0, run.stderr
    report = (tmp_path / "rep" / "report.md").read_text()
    assert report.startswith("# two runs")
    headings = [line for line in report.splitlines() if line.startswith("## ")]
    assert len(headings) == len(set(headings)), headings  # each section findable by its heading
    row = next(line for line in report.splitlines() if line.startswith("| tp1 |"))
    assert "+3 / -1 (p=0.62)" in row, row
    assert "| tp2 |" in report and "n/a" in next(line for line in report.splitlines() if line.startswith("| tp2 |"))
    for png in ("reward.png", "eval_accuracy.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:8] == PNG


def test_main_job_folder_puts_sft_first(tmp_path: Path) -> None:
    _run_dir(tmp_path / "reft", "reft", [0.1, 0.2], None)
    _run_dir(tmp_path / "sft", "sft", [0.0, 0.0], None)
    (tmp_path / "not-a-stage").mkdir()
    run = _report(str(tmp_path))
    assert run.returncode == 0, run.stderr
    rows = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["sft", "reft"], rows


def test_bad_run_folder_is_named(tmp_path: Path) -> None:
    run = _report("--out", str(tmp_path / "rep"), f"x={tmp_path / 'missing'}")
    assert run.returncode == 2 and "missing holds no summary.json" in run.stderr, run.stderr
    run = _report("--out", str(tmp_path / "rep"), "x=")
    assert run.returncode == 2 and "expected NAME=RUN_DIR" in run.stderr, run.stderr


def _final_answers(run_dir: Path, correct: list[bool]) -> None:
    (run_dir / "eval").mkdir()
    rows = [json.dumps({"id": f"q{i}", "correct": c}) for i, c in enumerate(correct)]
    (run_dir / "eval" / "final_predictions.jsonl").write_text("\n".join(rows) + "\n")


def test_rl_stages_are_compared_with_reft_question_by_question(tmp_path: Path) -> None:
    for stage in ("sft", "reft", "carft", "grpo"):
        _run_dir(tmp_path / stage, stage, [0.1, 0.2], None)
    _final_answers(tmp_path / "reft", [True, True, False, False, True, False])
    _final_answers(tmp_path / "carft", [True, False, True, True, True, False])  # 2 fixed, 1 broken
    _final_answers(tmp_path / "grpo", [True, True, False, False, True, False])  # the same answers
    run = _report(str(tmp_path))
    assert run.returncode == 0, run.stderr
    lines = (tmp_path / "report.md").read_text().splitlines()
    section = lines[lines.index("## Against reft") :]
    carft = next(line for line in section if line.startswith("| carft |"))
    grpo = next(line for line in section if line.startswith("| grpo |"))
    assert f"| 6 | +2 / -1 (p={sign_test_p(2, 1):.2g}) |" in carft, carft
    assert "| 6 | +0 / -0 (p=1) |" in grpo, grpo
    assert not any(line.startswith("| sft |") or line.startswith("| reft |") for line in section[:8])
