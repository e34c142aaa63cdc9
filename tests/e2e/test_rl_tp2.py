"""A reduced ReFT run with a tensor-parallel actor (two Ray workers, TP=2), end to end.

The sized-up runs of docs/reft-tiny/ use this layout; here two PPO rounds from a tiny SFT
checkpoint check that generation, log-probs, training, evaluation and the sharded
checkpoint all work across the actor's TP group, and that a rerun resumes it.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from tests.e2e._rl_helpers import (
    checkpoint_steps,
    metrics,
    resumed_step,
    run_rl,
    training_steps,
)

TP2 = ("actor.num_workers=2", "actor.parallel.tensor_parallel=2")


def _run(sft_dir: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_rl(sft_dir, out, *TP2, *overrides)


@pytest.mark.slow
def test_reduced_reft_run_with_tp2_actor(sft_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tp2"
    run = _run(sft_dir, out, "rl.steps=2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "actor x2" in run.stderr, run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and not summary["stopped_early"], summary
    assert summary["held_out_change"]["compared"] == 8, summary  # rl.eval_examples in the test arguments
    rounds = [r for r in metrics(out) if "policy_updated" in r]
    assert [r["step"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["policy_updated"] == 1.0 and math.isfinite(r["actor_loss"]), r
        # the 2-step SFT model rarely writes a number, so rewards (and gradients) may all be zero
        assert math.isfinite(r["grad_norm"]) and math.isfinite(r["critic_grad_norm"]), r
        assert 0.0 <= r["reward"] <= 1.0 and 0.0 <= r["clip_fraction"] <= 1.0 and r["entropy"] > 0, r
        assert all(r[f"time/{phase}"] > 0 for phase in ("generation", "logprobs", "critic", "reward", "training")), r
    assert checkpoint_steps(out, "actor") == checkpoint_steps(out, "critic") == [1, 2]

    rerun = _run(sft_dir, out, "rl.steps=3")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert resumed_step(rerun.stderr) == 2, rerun.stderr[-3000:]
    assert training_steps(metrics(out)) == [1, 2, 3]
