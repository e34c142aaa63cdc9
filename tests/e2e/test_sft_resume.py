"""SFT recipe end to end on the micro preset: SIGKILL mid-run, rerun, same final metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARGS = [
    "model.preset=micro",
    "encoding.max_total_tokens=128",  # the micro preset's window
    "encoding.max_prompt_tokens=64",
    "train.steps=10",
    "train.save_every=2",
    "train.eval_every=0",
    "train.eval_examples=12",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "train.eval_before=false",
    "train_data.synthetic.n_train=200",
    "train_data.synthetic.n_test=12",
    "eval_data.synthetic.n_train=200",
    "eval_data.synthetic.n_test=12",
    "generation.max_new_tokens=24",
    "optim.warmup_steps=2",
]


def _command(out: Path) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "recipes" / "sft.py"),
        "--config",
        str(ROOT / "configs" / "sft-tiny-synthetic.yaml"),
        f"output_dir={out}",
        *ARGS,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "PYTHONUNBUFFERED": "1"}


def _steps_logged(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _final(out: Path) -> tuple[dict, dict[int, float], list[dict]]:
    summary = json.loads((out / "summary.json").read_text())
    losses = {r["step"]: r["loss"] for r in _steps_logged(out) if "loss" in r}  # last write per step wins
    preds = [json.loads(line) for line in (out / "eval" / "final_predictions.jsonl").read_text().splitlines()]
    return summary, losses, preds


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_and_matches_uninterrupted(tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(
        _command(straight),
        check=True,
        env=_env(),
        cwd=ROOT,
        timeout=900,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    proc = subprocess.Popen(
        _command(killed),
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 900
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any(r.get("step", 0) >= 5 and "loss" in r for r in _steps_logged(killed)):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    checkpoints = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert "step_4" in checkpoints and "step_10" not in checkpoints, checkpoints

    rerun = subprocess.run(_command(killed), env=_env(), cwd=ROOT, timeout=900, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stderr

    s_sum, s_loss, s_pred = _final(straight)
    k_sum, k_loss, k_pred = _final(killed)
    assert k_sum["steps"] == s_sum["steps"] == 10
    assert k_sum["accuracy_after"] == s_sum["accuracy_after"]
    assert [p["completion"] for p in k_pred] == [p["completion"] for p in s_pred]
    for step in range(1, 11):
        assert k_loss[step] == pytest.approx(s_loss[step], abs=1e-6), f"loss differs at step {step}"


def test_bad_config_key_fails_with_named_key(tmp_path: Path) -> None:
    result = subprocess.run(
        [*_command(tmp_path / "bad"), "train.stepz=3"],
        env=_env(),
        cwd=ROOT,
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "train.stepz" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_sigusr1_saves_and_exits_cleanly_then_rerun_finishes(tmp_path: Path) -> None:
    out = tmp_path / "preempted"
    proc = subprocess.Popen(
        _command(out), env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        if any(r.get("step", 0) >= 3 and "loss" in r for r in _steps_logged(out)):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] and 3 <= summary["steps"] < 10
    assert (out / "checkpoints" / f"step_{summary['steps']}" / "COMPLETE").is_file()

    subprocess.run(
        _command(out),
        check=True,
        env=_env(),
        cwd=ROOT,
        timeout=900,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 10 and not summary["stopped_early"]
