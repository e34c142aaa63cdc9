"""Reproduction study: SFT vs ReFT vs Dr.GRPO vs CARFT ablations over several seeds.

    python recipes/study.py --config configs/study-synthetic.yaml   # the full study (~1.5-2.5 h, 2-core CPU)
    python recipes/study.py --config configs/study-quick.yaml       # minutes: the same pipeline, tiny budgets

Writes results.md (tables, what holds), results.json and accuracy_curves.png to output_dir.
Rerunning continues where it stopped (finished runs are skipped).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from carft_nemo.cli import guarded, parse  # noqa: E402
from carft_nemo.pipeline.study import StudyConfig, run_study  # noqa: E402


def main() -> None:
    cfg = parse(StudyConfig, __doc__, default_config=str(ROOT / "configs" / "study-quick.yaml"))
    path = guarded(lambda: run_study(cfg))
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
