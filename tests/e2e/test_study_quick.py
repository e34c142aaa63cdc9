"""The reproduction study's pipeline end to end on its quick budget (CI).

SFT, the pick of the start checkpoint and its evaluation, then every arm once (1 seed, 2 RL
steps) from it; the results document, JSON and curve plot are written, every arm has a row,
the CARFT runs log the contrastive diagnostics, and a rerun skips finished runs (it returns
in seconds and changes no run's summary).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from carft_nemo.pipeline.study import PAPER_ARMS as ARMS  # the arms configs/study-quick.yaml runs
from carft_nemo.telemetry.run_log import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def _study(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "recipes" / "study.py"),
            "--config",
            str(ROOT / "configs" / "study-quick.yaml"),
            f"output_dir={out}",
        ],
        cwd=ROOT,
        env=env,
        timeout=2400,
        capture_output=True,
        text=True,
    )


@pytest.mark.slow
def test_quick_study_runs_every_arm_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "study"
    first = _study(out)
    assert first.returncode == 0, first.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["aggregate"]) == set(ARMS)
    start = json.loads((out / "start.json").read_text())
    assert start["step"] in (5, 10) and Path(start["checkpoint"]).is_dir()
    for arm in ARMS:
        run = results["per_run"][arm]["1"]
        assert [s for s, _ in run["curve"]] == [0, 1, 2], (arm, run["curve"])
        assert 0.0 <= run["accuracy"] <= 1.0 and run["vs_start"]["compared"] == 16
    md = (out / "results.md").read_text()
    assert all(f"| {a} |" in md for a in ARMS) and "## Claims" in md
    assert (out / "accuracy_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every CARFT run logs what its term did, each step (diagnostics_every 1)
    for arm in (a for a in ARMS if a.startswith("carft")):
        steps = [r for r in read_metrics(out / "seed_1" / arm / "metrics.jsonl") if "actor_loss" in r]
        assert len(steps) == 2 and all("contrastive/grad_ratio" in r and "contrastive/cos_mean" in r for r in steps)
        assert all(r["contrastive/grad_ratio"] >= 0 for r in steps), arm
    before = {a: (out / "seed_1" / a / "summary.json").read_text() for a in ARMS}
    t0 = time.monotonic()
    second = _study(out)
    assert second.returncode == 0, second.stderr[-4000:]
    assert time.monotonic() - t0 < 120, "a finished study must not rerun its runs"
    assert {a: (out / "seed_1" / a / "summary.json").read_text() for a in ARMS} == before
