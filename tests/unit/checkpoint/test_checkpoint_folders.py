"""Complete-or-absent checkpoint folders: discovery, pruning and error messages (no process group)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from carft_nemo.checkpoint.dist_checkpoint import (
    COMPLETE_MARKER,
    METADATA_FILE,
    CheckpointError,
    discard_checkpoints_after,
    find_latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_metadata,
    resolve_checkpoint,
)


def _folder(root: Path, name: str, complete: bool) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "common.pt").write_text("x")
    if complete:
        (path / METADATA_FILE).write_text(json.dumps({"step": int(name.split("_")[-1])}))
        (path / COMPLETE_MARKER).write_text("")
    return path


def test_latest_ignores_temp_and_unmarked_folders(tmp_path: Path) -> None:
    _folder(tmp_path, "step_2", True)
    _folder(tmp_path, "step_10", True)
    _folder(tmp_path, "step_12", False)  # renamed by hand / marker missing
    _folder(tmp_path, ".tmp-step_11", True)  # complete files but never renamed
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step_10"  # numeric, not string, order
    assert resolve_checkpoint(tmp_path) == tmp_path / "step_10"
    assert find_latest_checkpoint(tmp_path / "absent") is None


def test_prune_keeps_newest_and_drops_stale_temp(tmp_path: Path) -> None:
    for s in (1, 2, 3, 4):
        _folder(tmp_path, f"step_{s}", True)
    _folder(tmp_path, ".tmp-step_3", False)
    _folder(tmp_path, ".tmp-step_7", False)  # may be a save in progress: kept
    prune_checkpoints(tmp_path, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-step_7", "step_3", "step_4"]


def test_a_protected_step_outlives_pruning_and_a_rewind_discards_newer_steps(tmp_path: Path) -> None:
    roots = [tmp_path / "actor", tmp_path / "critic"]
    for root in roots:
        for s in (0, 5, 10, 15):
            _folder(root, f"step_{s}", True)
    prune_checkpoints(roots, keep_last=2, protect=[5])  # the collapse guard's best
    assert [[s for s, _ in list_checkpoints(r)] for r in roots] == [[5, 10, 15]] * 2
    discard_checkpoints_after(roots, 5)
    assert [[s for s, _ in list_checkpoints(r)] for r in roots] == [[5]] * 2


def test_errors_name_the_path(tmp_path: Path) -> None:
    _folder(tmp_path, "step_5", False)
    with pytest.raises(CheckpointError, match="step_5: incomplete"):
        read_metadata(tmp_path / "step_5")
    with pytest.raises(CheckpointError, match="step_6: does not exist"):
        read_metadata(tmp_path / "step_6")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path)
