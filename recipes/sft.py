"""SFT on annotated CoT (ReFT/CARFT stage 1).

    python recipes/sft.py --config configs/sft-tiny-synthetic.yaml [key=value ...]
    torchrun --nproc-per-node 8 recipes/sft.py --config configs/sft-codellama-7b-gsm8k-1n8g-tp4.yaml

Rerunning the same command resumes from the newest complete checkpoint in output_dir.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from carft_nemo.cli import guarded, parse  # noqa: E402
from carft_nemo.distributed.layout import shutdown  # noqa: E402
from carft_nemo.training.sft import SFTConfig, run_sft  # noqa: E402


def main() -> None:
    cfg = parse(SFTConfig, __doc__)
    summary = guarded(lambda: run_sft(cfg))
    shutdown()
    if os.environ.get("RANK", "0") == "0":  # one line per job, not per process
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
