"""Run-time output of a training job, written by the logging rank only.

Three sinks for the same numbers: ``metrics.jsonl`` (one JSON object per step, appended
and flushed, so a crash loses nothing already logged and reports can be drawn from it),
TensorBoard scalars, and a tqdm progress bar with the latest values; Weights & Biases as
a fourth when ``logging.wandb.mode`` is set (``telemetry/wandb_sink.py``).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from carft_nemo.config import require
from carft_nemo.telemetry.wandb_sink import WandbConfig, WandbSink

LOG = logging.getLogger("carft_nemo")


def setup_logging(enabled: bool) -> None:
    """Rank 0 logs INFO to stderr; other ranks log warnings only."""
    if not LOG.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s carft] %(message)s", "%H:%M:%S"))
        LOG.addHandler(handler)
        LOG.propagate = False
    LOG.setLevel(logging.INFO if enabled else logging.WARNING)


@dataclass
class LoggingConfig:
    """``logging``: the progress bar's pace and sinks besides metrics.jsonl and TensorBoard."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    # seconds between progress-bar redraws: a batch job's log gets one line per redraw, so a
    # week-long Slurm run wants minutes here
    progress_interval_s: float = 1.0

    def __post_init__(self) -> None:
        require(self.progress_interval_s > 0, "progress_interval_s", f"must be > 0, got {self.progress_interval_s}")


class RunLogger:
    """Metrics sink for one stage (``sft``, ``ppo``, ...) under ``out_dir``."""

    def __init__(
        self,
        out_dir: str | Path,
        stage: str,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
        settings: LoggingConfig | None = None,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        """``settings``: the stage config's ``logging`` section; ``run_config``: what W&B records
        as the run's config."""
        settings = settings or LoggingConfig()
        self.enabled = enabled
        self.stage = stage
        self.out_dir = Path(out_dir)
        self._writer = None
        self._bar = None
        self._wandb = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if settings.wandb.mode != "disabled":
            self._wandb = WandbSink(settings.wandb, self.out_dir, stage, run_config)
        self._jsonl = (self.out_dir / "metrics.jsonl").open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
        if progress:
            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc=stage,
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=settings.progress_interval_s,
            )

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"stage": self.stage, "step": step, **clean}) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for key, value in clean.items():
                if isinstance(value, float) and math.isfinite(value):
                    self._writer.add_scalar(f"{self.stage}/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log(step, {k: v for k, v in clean.items() if isinstance(v, float) and math.isfinite(v)})
        if self._bar is not None:
            shown = {k: f"{v:.4g}" for k, v in clean.items() if isinstance(v, float) and k in _SHOWN}
            self._bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.close()
        self._jsonl.close()


_SHOWN = {"loss", "lr", "accuracy", "eval_accuracy", "reward", "kl", "value_loss", "step_time_s"}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (missing file: empty list)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
    return rows
