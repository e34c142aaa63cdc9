"""The main job: the whole pipeline on its tiny CPU default, with a report.

    python recipes/main.py                              # tiny preset, synthetic task, CPU
    python recipes/main.py --config configs/main-tiny.yaml sft.train.steps=50

Stages: SFT of the tiny preset on the synthetic arithmetic task with held-out evaluation
before and after, then ``report.md`` (results table, PNG learning curves) in output_dir.
Rerunning the same command resumes from the newest complete checkpoint.
"""

from pathlib import Path

from carft_nemo.cli import guarded, parse
from carft_nemo.pipeline.main_job import MainConfig, run_main

ROOT = Path(__file__).resolve().parents[1]  # the default configs live in configs/


def main() -> None:
    cfg = parse(MainConfig, __doc__, default_config=str(ROOT / "configs" / "main-tiny.yaml"))
    report = guarded(lambda: run_main(cfg))
    print(f"report written to {report}")


if __name__ == "__main__":
    main()
