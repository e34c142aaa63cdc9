"""Evaluate a checkpoint: greedy accuracy (and vote@k) with per-example predictions.

python recipes/evaluate.py checkpoint=outputs/main/sft/checkpoints output_dir=outputs/eval
python recipes/evaluate.py checkpoint=... data.name=gsm8k data.path=../shared/data/gsm8k data.split=test vote_k=8
"""

import json

from carft_nemo.cli import guarded, parse
from carft_nemo.distributed.layout import shutdown
from carft_nemo.evaluation.recipe import EvalConfig, run_evaluation


def main() -> None:
    cfg = parse(EvalConfig, __doc__)
    summary = guarded(lambda: run_evaluation(cfg))
    shutdown()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
