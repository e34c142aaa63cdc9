"""RL from an SFT checkpoint: ReFT's PPO, CARFT or Dr.GRPO, on Ray (actor, critic server, reward pool).

    python recipes/rl.py --config configs/reft-tiny-synthetic.yaml sft_checkpoint=outputs/main/sft
    python recipes/rl.py --config configs/carft-tiny-synthetic.yaml sft_checkpoint=... rl.steps=20

Which method runs is the config's: ``rl.algorithm: ppo`` (ReFT), plus ``contrastive.enabled:
true`` (CARFT), or ``rl.algorithm: grpo`` (Dr.GRPO). Rerunning the same command resumes from
the newest checkpoint complete for every role. A worker that dies stops the run with
``error: <role> worker (rank r on <node>) failed: ...`` and exit code 1; a node lost under a
multi-node run with ``error: node <node> is lost (...): <role> rank r, ... ran there``. See
recipes/carft.py's header for where this implementation departs from the papers' code.
"""

import json

from carft_nemo.cli import guarded, parse
from carft_nemo.rl.config import RLConfig
from carft_nemo.rl.controller import run_rl


def main() -> None:
    cfg = parse(RLConfig, __doc__)
    summary = guarded(lambda: run_rl(cfg))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
