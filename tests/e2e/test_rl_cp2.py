"""Short ReFT and CARFT runs with a context-parallel actor and critic (CP=2 each), end to end.

Each run takes a PPO step from a tiny SFT checkpoint with two Ray workers per model role, both
in one context-parallel group of 2: generation (the two ranks as generation replicas of their
own), log-probs, values, CARFT's embeddings, training and the sharded checkpoint; a rerun
resumes it and takes the next step.
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

CP2 = (
    "actor.num_workers=2",
    "actor.parallel.context_parallel=2",
    "critic.num_workers=2",
    "critic.parallel.context_parallel=2",
)


def _run(config: str, sft_dir: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_rl(sft_dir, out, *CP2, *overrides, config_name=config)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["reft-tiny-synthetic.yaml", "carft-tiny-synthetic.yaml"], ids=["reft", "carft"])
def test_a_run_with_cp2_actor_and_critic_trains_and_resumes(config: str, sft_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cp2"
    run = _run(config, sft_dir, out, "rl.steps=1")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "actor x2" in run.stderr and "critic x2" in run.stderr, run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and not summary["stopped_early"], summary
    (round_1,) = [r for r in metrics(out) if "policy_updated" in r]
    assert round_1["policy_updated"] == 1.0 and math.isfinite(round_1["actor_loss"]), round_1
    assert math.isfinite(round_1["grad_norm"]) and math.isfinite(round_1["critic_grad_norm"]), round_1
    assert 0.0 <= round_1["reward"] <= 1.0 and round_1["entropy"] > 0, round_1
    if config.startswith("carft"):
        assert math.isfinite(round_1["contrastive/loss"]), round_1
        assert "gradient probe needs pipeline_parallel and context_parallel 1" in run.stderr
    assert checkpoint_steps(out, "actor") == checkpoint_steps(out, "critic") == [1]

    rerun = _run(config, sft_dir, out, "rl.steps=2")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert resumed_step(rerun.stderr) == 1, rerun.stderr[-3000:]
    assert training_steps(metrics(out)) == [1, 2]
