"""The reproduction study's pipeline end to end on its quick budget (CI).

Every method of the study runs once (1 seed, 2 RL steps) from one SFT checkpoint; the
results document, JSON and curve plot are written, every method has a row, and a rerun
skips finished runs (it returns in seconds and changes no run's summary).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from carft_nemo.pipeline.study import METHODS

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
def test_quick_study_runs_every_method_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "study"
    first = _study(out)
    assert first.returncode == 0, first.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["aggregate"]) == set(METHODS) | {"sft"}
    for method in METHODS:
        run = results["per_run"][method]["1"]
        assert [s for s, _ in run["curve"]] == [0, 1, 2], (method, run["curve"])
        assert 0.0 <= run["accuracy"] <= 1.0
    md = (out / "results.md").read_text()
    assert all(f"| {m} |" in md for m in METHODS) and "## What holds" in md
    assert (out / "accuracy_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = {m: (out / "seed_1" / m / "summary.json").read_text() for m in METHODS}
    t0 = time.monotonic()
    second = _study(out)
    assert second.returncode == 0, second.stderr[-4000:]
    assert time.monotonic() - t0 < 120, "a finished study must not rerun its runs"
    assert {m: (out / "seed_1" / m / "summary.json").read_text() for m in METHODS} == before
