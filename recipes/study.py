"""Reproduction study: SFT, ReFT, Dr.GRPO and the authors' CARFT trainers from one start, several seeds.

    python recipes/study.py --config configs/study-synthetic.yaml   # the full study (~3 h, 2-core CPU)
    python recipes/study.py --config configs/study-quick.yaml       # minutes: the same pipeline, tiny budgets

Writes results.md (tables, what holds), results.json and accuracy_curves.png to output_dir.
Rerunning continues where it stopped (finished runs are skipped).
"""

from pathlib import Path

from carft_nemo.cli import guarded, parse
from carft_nemo.pipeline.study import StudyConfig, run_study

ROOT = Path(__file__).resolve().parents[1]  # the default configs live in configs/


def main() -> None:
    cfg = parse(StudyConfig, __doc__, default_config=str(ROOT / "configs" / "study-quick.yaml"))
    path = guarded(lambda: run_study(cfg))
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
