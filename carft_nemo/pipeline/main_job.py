"""The main job: SFT (with held-out evaluation before and after) and a report.

Later stages (ReFT, CARFT, Dr.GRPO from the same SFT checkpoint) join here as they land.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from carft_nemo.config import require, save_resolved
from carft_nemo.distributed.layout import shutdown
from carft_nemo.reporting.report import StageResult, write_report
from carft_nemo.training.run_log import LOG
from carft_nemo.training.sft import SFTConfig, run_sft


@dataclass
class MainConfig:
    output_dir: str = "outputs/main"
    sft: SFTConfig = field(default_factory=SFTConfig)

    def __post_init__(self) -> None:
        require(bool(self.output_dir), "output_dir", "must be set")


def run_main(cfg: MainConfig) -> Path:
    """Run every stage into ``cfg.output_dir`` and return the report's path."""
    out = Path(cfg.output_dir)
    cfg.sft.output_dir = str(out / "sft")
    started = time.perf_counter()
    summary = run_sft(cfg.sft)
    shutdown()
    save_resolved(cfg, out / "config.yaml")
    notes = [f"total wall time {time.perf_counter() - started:.0f} s (this invocation; a resumed run counts only itself)",
             f"seed {cfg.sft.train.seed}; model preset {cfg.sft.model.preset}; resolved config: config.yaml",
             f"SFT checkpoints: {summary['final_checkpoint']}"]
    report = write_report(out, [StageResult("sft", out / "sft")], title="carft-nemo main job", notes=notes)
    LOG.info("report: %s", report)
    return report
