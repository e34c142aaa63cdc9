"""recipes/convert_checkpoint.py end to end in single processes: HF -> megatron -> HF, and user errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed._checkpoint_helpers import make_tiny_hf

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "recipes" / "convert_checkpoint.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONWARNINGS": "ignore"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT
    )


def _main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.slow
def test_cli_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from carft_nemo.checkpoint.hf_io import LazySafetensors

    hf = make_tiny_hf(tmp_path / "hf", "qwen2", tied=False)
    done = _run("hf-to-megatron", "--hf", str(hf), "--out", str(tmp_path / "ckpt"), "--step", "7")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "ckpt" / "step_7" / "COMPLETE").is_file()
    done = _run("megatron-to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"))
    assert done.returncode == 0, done.stderr[-3000:]
    original, back = load_file(str(hf / "model.safetensors")), LazySafetensors(tmp_path / "back")  # streamed: shards
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_cli_user_errors_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Checked before any process group starts, so they run in the test process."""
    main = _main()
    hf = make_tiny_hf(tmp_path / "hf", "llama", tied=False)
    assert main(["hf-to-megatron", "--hf", str(hf), "--out", str(tmp_path / "x"), "--tp", "3"]) == 2
    assert "parallel.tensor_parallel: 3 does not divide model.num_attention_heads=4" in capsys.readouterr().err
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    assert main(["hf-to-megatron", "--hf", str(tmp_path / "gpt2"), "--out", str(tmp_path / "x")]) == 2
    assert "GPT2LMHeadModel" in capsys.readouterr().err
    assert main(["megatron-to-hf", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
