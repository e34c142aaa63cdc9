"""Weights & Biases as an optional fourth sink of :class:`~carft_nemo.telemetry.run_log.RunLogger`.

Not a dependency: ``pip install wandb`` (or ``.[dev]``) where it is wanted. ``mode: offline``
writes a local run directory under the stage's output folder and needs no network
(``wandb sync`` uploads it later); ``online`` logs as it goes. Scalars are logged against
their own ``<stage>/step`` axis, not W&B's internal step, because a collapse-guard rollback
sends the step back and W&B drops rows whose internal step goes backwards. A rerun of a
stopped stage continues the same W&B run (its id is kept in ``wandb_run_id.txt``).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carft_nemo.config import ConfigError, require

WANDB_MODES = ("disabled", "offline", "online")


@dataclass
class WandbConfig:
    """``logging.wandb``: where a stage's scalars go on Weights & Biases."""

    mode: str = "disabled"
    project: str = "carft-nemo"
    entity: str | None = None
    group: str | None = None  # e.g. one main job or study: its stages side by side

    def __post_init__(self) -> None:
        require(self.mode in WANDB_MODES, "mode", f"must be one of {WANDB_MODES}, got {self.mode!r}")
        require(bool(self.project), "project", "must be set")


class WandbSink:
    """One W&B run for one stage's output folder."""

    def __init__(self, cfg: WandbConfig, out_dir: Path, stage: str, config: Mapping[str, Any] | None = None) -> None:
        try:
            import wandb
        except ImportError as err:
            raise ConfigError(
                f"logging.wandb.mode: {cfg.mode!r} needs the wandb package (pip install wandb), or set it to disabled"
            ) from err
        id_file = out_dir / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.stage = stage
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            name=f"{out_dir.name}-{stage}",
            id=run_id,
            resume="allow",
            mode=cfg.mode,
            dir=str(out_dir),
            config=dict(config or {}),
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.run.define_metric(f"{stage}/step")
        self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log({f"{self.stage}/step": step, **{f"{self.stage}/{k}": v for k, v in scalars.items()}})

    def close(self) -> None:
        self.run.finish()


__all__ = ["WANDB_MODES", "WandbConfig", "WandbSink"]
