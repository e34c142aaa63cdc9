"""CARFT: ReFT's PPO + contrastive signals on annotated CoT + embedding-enhanced partial reward.

    python recipes/carft.py sft_checkpoint=outputs/main/sft               # configs/carft-tiny-synthetic.yaml
    python recipes/carft.py --config configs/carft-codellama-7b-gsm8k-ncot-1n8g-tp2.yaml sft_checkpoint=...

Same runner as ``recipes/rl.py`` (the config's ``contrastive`` section switches CARFT on);
both critic layouts work: ``critic.layout: separate`` (a critic server group) or ``shared``
(a value head on the policy backbone, the paper's code, value-loss coefficient 5).

Where this departs from the paper's code (github WNQzhu/CARFT, my_cl_trainer_v4/v9/v11), and why:

1. Separate critic (default at scale): the token weights softmax_t(V_t) come from the critic
   server's rollout-time values for the on-policy and the annotated sequence (detached); the
   paper has one model whose value head is trained with the policy. The shared layout here
   follows the paper: live values from the shared head, with gradient.
2. The projection e_t = W h_t (64-d) is its own bias-free head on the policy's last pipeline
   stage, not the first layer of a two-layer value head, and has no dropout: the critic and the
   embedding can then live in different models and the gradient of the contrastive loss reaches
   the policy in both layouts. The shared value head is linear (the paper's is an MLP).
3. The data-parallel all-gather of on-policy embeddings carries gradient by default (InfoNCE
   denominators train too); ``contrastive.gather_with_grad: false`` restores the paper's detached
   gather.
4. An empty CoT (or an empty LCS part) gives z = 0 and the sample is left out of the loss; the
   paper's masked softmax falls back to a uniform weight over all positions, prompt included.
5. The partial reward replaces the reward of samples flagged wrong-but-extractable by the reward
   server; the paper overwrites rewards equal to 0.1, which also catches a correct-by-chance
   float match of 0.1.
6. The on-policy CoT is the whole response including its EOS token; annotated embeddings are
   computed at rollout time with the current policy and the rollout's critic values (the paper
   also computes them without gradient before the update).
7. The contrastive loss is computed per micro-batch with the whole data-parallel micro-batch as
   negatives; its weight in the loss is c_cl = ``contrastive.coef``.
"""

import json
import sys
from pathlib import Path

from carft_nemo.cli import guarded, parse
from carft_nemo.rl.config import RLConfig
from carft_nemo.rl.controller import run_rl

ROOT = Path(__file__).resolve().parents[1]  # the default configs live in configs/


def main() -> None:
    cfg = parse(RLConfig, __doc__, default_config=str(ROOT / "configs" / "carft-tiny-synthetic.yaml"))
    if not cfg.contrastive.enabled:
        print("error: contrastive.enabled is false: this is ReFT; run recipes/rl.py for it", file=sys.stderr)
        raise SystemExit(2)
    summary = guarded(lambda: run_rl(cfg))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
