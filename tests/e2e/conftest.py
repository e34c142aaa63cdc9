"""Fixtures shared by the end-to-end RL tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e._rl_helpers import ROOT, RUN_TIMEOUT_S, env, sft_command


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step SFT checkpoint + tokenizer of the tiny model (quality is irrelevant here)."""
    out = tmp_path_factory.mktemp("rl_sft") / "sft"
    done = subprocess.run(sft_command(out), cwd=ROOT, env=env(), timeout=RUN_TIMEOUT_S, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"SFT for the RL end-to-end tests failed:\n{done.stderr[-3000:]}")
    return out
