"""Checkpoint folder life cycle in one gloo process: keep-last-K, a crash mid-save, clear errors."""

from __future__ import annotations

from pathlib import Path

from tests.multiprocess import run_ranks


def _lifecycle(rank: int, world: int, root: str):
    from carft_nemo.checkpoint.dist_checkpoint import (
        CheckpointError,
        find_latest_checkpoint,
        list_checkpoints,
        load_checkpoint,
        save_checkpoint,
    )
    from carft_nemo.distributed.layout import ParallelConfig, initialize
    from carft_nemo.models.config import ModelConfig
    from carft_nemo.models.gpt import build_gpt_model

    parallel = ParallelConfig()
    initialize(parallel, seed=0)
    cfg = ModelConfig(preset="micro", vocab_size=64)
    model = build_gpt_model(cfg, parallel)
    out: dict[str, object] = {}
    for step in (1, 2, 3):
        save_checkpoint(root, step, {"policy": model}, data_state={"position": step}, keep_last=2)
    out["after_keep_last"] = [s for s, _ in list_checkpoints(root)]
    try:  # a crash mid-save: the common state cannot be pickled after the shards were planned
        save_checkpoint(root, 4, {"policy": model}, data_state={"position": 4, "bad": lambda: None}, keep_last=2)
        out["crash"] = "no exception"
    except Exception as err:  # noqa: BLE001 - any failure is the crash we simulate
        out["crash"] = type(err).__name__
    out["tmp_left"] = (Path(root) / ".tmp-step_4").is_dir()
    out["latest"] = find_latest_checkpoint(root).name
    out["resumed_step"] = load_checkpoint(root, {"policy": build_gpt_model(cfg, parallel)}).step
    errors = {}
    for name, call in {
        "incomplete": lambda: load_checkpoint(Path(root) / ".tmp-step_4", {"policy": model}),
        "missing": lambda: load_checkpoint(Path(root) / "step_9", {"policy": model}),
        "empty_root": lambda: load_checkpoint(Path(root) / "nothing_here", {"policy": model}),
        "wrong_group": lambda: load_checkpoint(root, {"critic": model}),
        "wrong_shape": lambda: load_checkpoint(
            root, {"policy": build_gpt_model(ModelConfig(preset="micro", vocab_size=64, hidden_size=32), parallel)}
        ),
    }.items():
        try:
            call()
            errors[name] = "no error"
        except CheckpointError as err:
            errors[name] = str(err)
    out["errors"] = errors
    return out


def test_keep_last_crash_and_errors(tmp_path: Path) -> None:
    (out,) = run_ranks(_lifecycle, 1, str(tmp_path))
    assert out["after_keep_last"] == [2, 3]
    assert out["crash"] != "no exception"
    assert out["latest"] == "step_3" and out["resumed_step"] == 3
    assert not (tmp_path / "step_4").exists()
    errors = out["errors"]
    assert "incomplete" in errors["incomplete"] and ".tmp-step_4" in errors["incomplete"]
    assert "does not exist" in errors["missing"] and "step_9" in errors["missing"]
    assert "no complete checkpoint" in errors["empty_root"]
    assert "critic" in errors["wrong_group"]
    assert "could not load" in errors["wrong_shape"] and "step_3" in errors["wrong_shape"]
