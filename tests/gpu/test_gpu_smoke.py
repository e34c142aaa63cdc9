"""GPU checks (skipped without CUDA): the same recipes on NCCL, bf16 and TE when present."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _smoke(args: list[str], nproc: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        str(ROOT / "recipes" / "smoke.py"),
        *args,
    ]
    out = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "MASTER_ADDR": "127.0.0.1"}, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("SMOKE_RESULT"))
    return json.loads(line.split(" ", 1)[1])


def test_smoke_trains_on_one_gpu() -> None:
    result = _smoke(["--steps", "5"], 1)
    assert result["losses"][-1] < result["losses"][0]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_smoke_tp2_on_two_gpus() -> None:
    result = _smoke(["--steps", "5", "--tp", "2"], 2)
    assert result["losses"][-1] < result["losses"][0]
