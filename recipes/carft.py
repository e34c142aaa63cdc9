"""CARFT: ReFT's PPO + a contrastive loss on the embeddings of annotated and sampled CoTs.

    python recipes/carft.py sft_checkpoint=outputs/main/sft               # configs/carft-tiny-synthetic.yaml
    python recipes/carft.py --config configs/carft-codellama-7b-gsm8k-ncot-1n8g-tp2.yaml sft_checkpoint=...

Same runner as ``recipes/rl.py`` (the config's ``contrastive`` section switches CARFT on).
``contrastive.variant`` picks the authors' trainer (github WNQzhu/CARFT, code/vae/scripts):
``v4`` by default, the one their README says reproduces the paper (the positive signal: an
InfoNCE pulling each correct sample's CoT embedding toward its annotated CoT's, positive cosine
clamped at 0.9, tau 0.2, annotated and gathered embeddings without gradient); ``v9`` adds the
negative signal, ``v11`` the embedding-enhanced partial reward, ``v8`` is the negative signal
alone. Each step logs what the term does (``contrastive/grad_ratio``, ``grad_cosine``,
``cos_*``, ``correct_under_clamp``, ``partial_reward_*``: see ``contrastive.diagnostics_every``).

Where this still departs from the authors' code, and why:

1. Value head. Theirs is Linear(h, 64) -> ReLU -> Linear(64, 1) on the projection e_t itself,
   so the value loss trains the projection (and the contrastive loss reaches the value head
   through the pooling weights softmax_t(V_t)). Here the projection is its own head, and the
   values come from the separate critic server (tiny default: rollout-time values, no gradient;
   the critic can then have its own layout) or from a linear value head on the policy's last
   hidden states (``critic.layout: shared``, the paper-scale configs: live values with gradient,
   as theirs, but the value loss does not train the projection).
2. LR schedule. The paper-scale CARFT configs decay linearly to 0 like theirs (HF's default);
   the tiny configs keep ReFT's constant rate, so ReFT and CARFT there differ only in the term.
3. Gradient clipping at 1.0 (ReFT's); their v4 trainer calls no clip (whether DeepSpeed clips
   in their runs is not recorded).
4. The contrastive mean is over the correct samples of the global data-parallel batch; theirs
   divides by each rank's count and lets DDP average (the same when ranks have equal counts).
5. An empty CoT (or an empty LCS part) gives z = 0 and the sample is left out; their masked
   softmax falls back to a uniform weight over every position, prompt and padding included.
6. The partial reward (v11) replaces the reward of samples the reward server flags
   wrong-but-extractable; theirs overwrites rewards equal to 0.1 (the same samples in ReFT's
   reward, 1 / 0.1 / 0).
7. The LCS (v8, v9) runs over the real tokens of prompt + CoT, theirs also over their batch's
   left padding; ``contrastive.lcs_cot_only: true`` (ours) restricts it to the CoTs. In v9 the
   common parts of the other samples enter the denominator gathered over data parallel and
   without gradient (theirs: the local micro-batch's, with gradient).
8. Our extensions, off by default: ``gather_with_grad`` (gradient through the all-gather: the
   denominators then push every on-policy embedding away from the annotated ones) and
   ``lcs_cot_only``.
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
