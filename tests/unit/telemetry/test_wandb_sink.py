"""Weights & Biases as a sink of RunLogger: offline, no network, the same scalars as TensorBoard."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from carft_nemo.config import ConfigError
from carft_nemo.telemetry.run_log import LoggingConfig, RunLogger
from carft_nemo.telemetry.wandb_sink import WandbConfig

BLOCK = 32768  # the W&B transaction log is LevelDB's log format: 32 KiB blocks of framed chunks
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_history(run_file: Path) -> list[dict[str, float]]:
    """The history rows of an offline run's ``run-<id>.wandb`` (read here, without W&B's own reader)."""
    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, chunks, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if (length, kind) == (0, 0):
            pos += left
            continue
        body, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == FULL:
            chunks.append(body)
        elif kind == FIRST:
            pending = body
        elif kind == MIDDLE:
            pending += body
        elif kind == LAST:
            chunks.append(pending + body)
    rows = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows.append({k: v for k, v in items.items() if not k.startswith("_")})
    return rows


def tensorboard_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _log_run(out: Path, rows: list[tuple[int, dict[str, float]]]) -> None:
    logger = RunLogger(
        out, "ppo", enabled=True, total_steps=3, progress=False, settings=LoggingConfig(WandbConfig(mode="offline"))
    )
    for step, metrics in rows:
        logger.log(step, metrics)
    logger.close()


def test_an_offline_run_holds_the_same_scalars_as_tensorboard(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # step 2 logged twice: the collapse guard's rollback sends the step back
    rows = [
        (1, {"reward": 0.25, "kl": 0.5}),
        (2, {"reward": 0.5, "kl": 1.25}),
        (3, {"reward": 0.1}),
        (2, {"reward": 0.75}),
    ]
    _log_run(out, rows)
    run_files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    deadline = time.monotonic() + 60  # W&B's writer process may still be flushing on a loaded machine
    while not (history := wandb_history(run_files[0])) and time.monotonic() < deadline:
        time.sleep(0.5)
    from_wandb: dict[str, list[tuple[int, float]]] = {}
    for row in history:
        for key, value in row.items():
            if key != "ppo/step":
                from_wandb.setdefault(key, []).append((int(row["ppo/step"]), float(value)))
    board = tensorboard_scalars(out)
    assert set(from_wandb) == set(board) == {"ppo/reward", "ppo/kl"}
    for tag, points in board.items():  # TensorBoard keeps float32
        assert [s for s, _ in from_wandb[tag]] == [s for s, _ in points]
        assert [v for _, v in from_wandb[tag]] == pytest.approx([v for _, v in points], rel=1e-6)
    assert from_wandb["ppo/reward"] == [(1, 0.25), (2, 0.5), (3, 0.1), (2, 0.75)]  # nothing dropped


def test_a_rerun_continues_the_same_wandb_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _log_run(out, [(1, {"reward": 0.5})])
    first_id = (out / "wandb_run_id.txt").read_text().strip()
    _log_run(out, [(2, {"reward": 0.6})])
    assert (out / "wandb_run_id.txt").read_text().strip() == first_id
    folders = [p.name for p in (out / "wandb").glob("offline-run-*")]
    assert len(folders) == 2 and all(first_id in name for name in folders), folders


def test_an_unknown_mode_names_its_key() -> None:
    with pytest.raises(ConfigError, match="^mode: must be one of"):
        WandbConfig(mode="cloud")
