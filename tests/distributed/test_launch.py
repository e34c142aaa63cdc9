"""The smoke entry point runs under the real launchers: a plain process and torchrun (TP=2)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.multiprocess import free_port

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "recipes" / "smoke.py"
SMALL = ["--steps", "3", "--micro-batches", "2", "--micro-batch-size", "2", "--seq-len", "32", "--vocab", "256"]
TIMEOUT = 300


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run in its own session so a hang can be killed with every child (no process left behind)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd} timed out after {TIMEOUT}s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SMOKE_RESULT ")]
    assert len(lines) == 1, f"expected one SMOKE_RESULT line (rank 0 only), got {len(lines)}:\n{proc.stdout}"
    return json.loads(lines[0].split(" ", 1)[1])


def _assert_learns(result: dict) -> None:
    losses = result["losses"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(256), abs=0.5)  # a fresh model is near uniform
    assert losses[-1] < losses[0] - 0.05, f"loss did not fall on a fixed batch: {losses}"


def test_smoke_single_process() -> None:
    result = _result(_run([sys.executable, str(SMOKE), *SMALL]))
    assert (result["world_size"], result["tp"], result["dp"]) == (1, 1, 1)
    _assert_learns(result)


def test_smoke_under_torchrun_tp2() -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(SMOKE),
        "--tp",
        "2",
        *SMALL,
    ]
    result = _result(_run(cmd))
    assert (result["world_size"], result["tp"], result["dp"]) == (2, 2, 1)
    _assert_learns(result)


def test_smoke_rejects_bad_layout_without_traceback() -> None:
    proc = _run([sys.executable, str(SMOKE), "--tp", "3", *SMALL])
    assert proc.returncode == 2
    assert "parallel: world size 1 is not divisible" in proc.stderr
    assert "Traceback" not in proc.stderr
