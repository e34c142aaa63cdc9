"""Distributed checkpoints: exact same-layout resume, and TP=2 -> TP=1 / PP=2 -> PP=1 resharding.

One pair of spawned gloo processes runs every phase (the spawn and megatron's import are
the expensive part):

1. TP=2: train 6 steps recording losses, saving after step 3 (model, Adam, LR schedule,
   RNG, data position). Batches draw from python/numpy/torch RNGs and megatron's tracker,
   so a state that is not restored changes the losses. A fresh model from another seed,
   with scrambled RNGs, loads the checkpoint and must reproduce steps 4-6 bit for bit.
2. TP=1 (data parallel 2) loads the TP=2 checkpoint and must give the TP=2 model's loss and,
   after one more Adam step with the resharded moments, the same next loss (to float tolerance).
3. PP=2 trains one step and saves; PP=1 loads it and must give the same loss and next loss.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from tests.multiprocess import run_ranks

VOCAB = 96  # a multiple of 8*2: the same padded vocabulary at TP=1 and TP=2 (see _phases)
STEPS, SAVE_AT = 6, 3


def _setup(tp: int, pp: int, seed: int):
    from carft_nemo.distributed.layout import ParallelConfig, initialize
    from carft_nemo.models.config import ModelConfig
    from carft_nemo.models.gpt import build_gpt_model
    from carft_nemo.training.optim import OptimConfig, make_trainable

    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    initialize(parallel, seed=seed)
    cfg = ModelConfig(preset="micro", vocab_size=VOCAB)
    optim = OptimConfig(lr=3e-3, min_lr=1e-4, warmup_steps=2, schedule="cosine", clip_grad=1.0)
    return make_trainable(build_gpt_model(cfg, parallel), cfg, parallel, optim, total_steps=STEPS)


def _batches(position: int, use_tracker: bool = True) -> list[dict[str, torch.Tensor]]:
    """Two micro-batches that depend on every RNG and on the data position."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    shift = random.randint(0, 50) + int(np.random.randint(0, 50)) + position
    tracker_draw = torch.zeros(1, dtype=torch.long)
    if use_tracker:
        with get_cuda_rng_tracker().fork():
            tracker_draw = torch.randint(0, 50, (1,))
        # the tracker is seeded per TP rank: agree on one value so every rank sees the same batch
        torch.distributed.all_reduce(tracker_draw, group=ps.get_tensor_model_parallel_group())
    tokens = (torch.randint(0, VOCAB, (2, 2, 16)) + shift + tracker_draw) % VOCAB
    return [{"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()} for t in tokens]


def _train_step(tm, position: int, use_tracker: bool = True) -> float | None:
    from carft_nemo.models.step import forward_backward, lm_loss

    tm.zero_grad()
    metrics = forward_backward(tm.model, _batches(position, use_tracker), lm_loss())
    tm.step()
    return float(torch.stack([m["loss"] for m in metrics]).mean()) if metrics else None


def _eval_loss(tm, position: int = 999) -> float | None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from carft_nemo.models.step import forward_backward, lm_loss

    # leave every RNG as it was, so evaluating does not perturb the run being compared
    tracker = get_cuda_rng_tracker()
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state(), tracker.get_states())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    metrics = forward_backward(tm.model, _batches(position, use_tracker=False), lm_loss(), forward_only=True)
    random.setstate(state[0]), np.random.set_state(state[1]), torch.set_rng_state(state[2])
    tracker.set_states(state[3])
    return float(torch.stack([m["loss"] for m in metrics]).mean()) if metrics else None


def _continue(tm) -> tuple:
    """(loss, one more Adam step's loss, loss after it) on RNG-independent batches."""
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    return _eval_loss(tm), _train_step(tm, position=0, use_tracker=False), _eval_loss(tm)


def _scramble_rngs() -> None:
    random.seed(12345), np.random.seed(12345), torch.manual_seed(12345)


def _phases(rank: int, world: int, root: str):
    from carft_nemo.checkpoint.dist_checkpoint import load_checkpoint, save_checkpoint

    out: dict[str, object] = {}
    # 1. same-layout resume at TP=2
    tm = _setup(2, 1, seed=1)
    losses = []
    for step in range(STEPS):
        losses.append(_train_step(tm, position=step))
        if step + 1 == SAVE_AT:
            save_checkpoint(
                Path(root) / "tp2",
                SAVE_AT,
                {"policy": tm},
                data_state={"position": SAVE_AT},
                metadata={"note": "test"},
                keep_last=2,
            )
            out["lr_at_save"] = tm.lr
    out["uninterrupted"] = losses[SAVE_AT:]
    final_uninterrupted = {k: v.clone() for k, v in tm.model.module.state_dict().items() if v is not None}

    tm = _setup(2, 1, seed=2)
    _scramble_rngs()
    info = load_checkpoint(Path(root) / "tp2", {"policy": tm})
    out["info"] = (info.step, info.data_state, info.restored_rng, info.restored_optimizer, tm.lr)
    out["resumed"] = [_train_step(tm, position=p) for p in range(info.data_state["position"], STEPS)]
    final_resumed = tm.model.module.state_dict()
    out["weights_equal"] = all(torch.equal(v, final_resumed[k]) for k, v in final_uninterrupted.items())

    # 2. TP=2 -> TP=1 with the optimizer state resharded (TP=2 reloaded as the reference)
    for name, (tp, pp) in (("tp2", (2, 1)), ("tp1", (1, 1))):
        tm = _setup(tp, pp, seed=3)
        info = load_checkpoint(Path(root) / "tp2" / f"step_{SAVE_AT}", {"policy": tm})
        out[f"{name}_info"] = (info.restored_rng, info.restored_optimizer)
        out[f"{name}_continue"] = _continue(tm)

    # 3. PP=2 -> PP=1
    tm = _setup(1, 2, seed=4)
    _train_step(tm, position=0)
    save_checkpoint(Path(root) / "pp2", 1, {"policy": tm}, data_state={"position": 1})
    out["pp2_continue"] = _continue(tm)
    tm = _setup(1, 1, seed=5)
    load_checkpoint(Path(root) / "pp2", {"policy": tm})
    out["pp1_continue"] = _continue(tm)
    return out


def test_resume_and_reshard(tmp_path: Path) -> None:
    results = run_ranks(_phases, 2, str(tmp_path))
    r0, r1 = results
    for r in results:
        step, data_state, rng, optim, lr = r["info"]
        assert (step, data_state, rng, optim) == (SAVE_AT, {"position": SAVE_AT}, True, True)
        assert lr == r["lr_at_save"], "LR schedule not restored"
        assert r["resumed"] == r["uninterrupted"], "resumed losses differ from the uninterrupted run"
        assert r["weights_equal"], "weights after resume differ from the uninterrupted run"
        assert r["tp2_info"] == (True, True) and r["tp1_info"] == (False, True)  # RNG only at the same layout
    # PP=2: losses live on the last stage (rank 1); TP=1/PP=1 runs data-parallel on both ranks
    assert r0["pp2_continue"] == (None, None, None) and None not in r1["pp2_continue"]
    for r in results:
        for got, want in ((r["tp1_continue"], r0["tp2_continue"]), (r["pp1_continue"], r1["pp2_continue"])):
            diffs = [abs(a - b) for a, b in zip(got, want)]
            assert max(diffs) < 1e-5, f"resharded checkpoint: {got} vs {want}"
    assert len(set(r0["uninterrupted"])) == len(r0["uninterrupted"])  # the run actually trains
