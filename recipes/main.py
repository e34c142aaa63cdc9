"""The main job: the whole pipeline on its tiny CPU default, with a report.

    python recipes/main.py                              # tiny preset, synthetic task, CPU
    python recipes/main.py --config configs/main-tiny.yaml train.steps=50

Stages: SFT of the tiny preset on the synthetic arithmetic task with held-out evaluation
before and after, then ``report.md`` with the results table and learning curves (PNG) in
the output folder. Rerunning resumes from the newest complete checkpoint.
"""

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from carft_nemo.cli import guarded, parse  # noqa: E402
from carft_nemo.config import require  # noqa: E402
from carft_nemo.distributed.layout import shutdown  # noqa: E402
from carft_nemo.reporting.report import StageResult, write_report  # noqa: E402
from carft_nemo.training.run_log import LOG  # noqa: E402
from carft_nemo.training.sft import SFTConfig, run_sft  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class MainConfig:
    output_dir: str = "outputs/main"
    sft: SFTConfig = field(default_factory=SFTConfig)

    def __post_init__(self) -> None:
        require(bool(self.output_dir), "output_dir", "must be set")


def main() -> None:
    cfg = parse(MainConfig, __doc__, default_config=str(ROOT / "configs" / "main-tiny.yaml"))
    out = Path(cfg.output_dir)
    cfg.sft.output_dir = str(out / "sft")
    t0 = time.perf_counter()
    guarded(lambda: run_sft(cfg.sft))
    shutdown()
    report = write_report(out, [StageResult("sft", out / "sft")], title="carft-nemo main job (tiny, synthetic, CPU)",
                          notes=[f"total wall time {time.perf_counter() - t0:.0f} s",
                                 "resolved configs: sft/config.yaml"])
    LOG.info("report: %s", report)
    print(f"report written to {report}")


if __name__ == "__main__":
    main()
