"""Evaluate a checkpoint: greedy accuracy (and vote@k) with per-example predictions.

python recipes/evaluate.py checkpoint=outputs/main/sft/checkpoints output_dir=outputs/eval
python recipes/evaluate.py --config configs/eval-gsm8k.yaml checkpoint=... vote_k=8
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from carft_nemo.cli import guarded, parse  # noqa: E402
from carft_nemo.distributed.layout import shutdown  # noqa: E402
from carft_nemo.evaluation.recipe import EvalConfig, run_evaluation  # noqa: E402


def main() -> None:
    cfg = parse(EvalConfig, __doc__)
    summary = guarded(lambda: run_evaluation(cfg))
    shutdown()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
