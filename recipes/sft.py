"""SFT on annotated CoT (ReFT/CARFT stage 1).

    python recipes/sft.py --config configs/sft-tiny-synthetic.yaml [key=value ...]
    torchrun --nproc-per-node 8 recipes/sft.py --config configs/sft-codellama-7b-gsm8k-ncot-1n8g-tp2.yaml

Rerunning the same command resumes from the newest complete checkpoint in output_dir.
"""

import json
import os

from carft_nemo.cli import guarded, parse
from carft_nemo.distributed.layout import shutdown
from carft_nemo.sft.config import SFTConfig
from carft_nemo.sft.run import run_sft


def main() -> None:
    cfg = parse(SFTConfig, __doc__)
    summary = guarded(lambda: run_sft(cfg))
    shutdown()
    if os.environ.get("RANK", "0") == "0":  # one line per job, not per process
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
