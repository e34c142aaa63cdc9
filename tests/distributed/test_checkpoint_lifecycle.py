"""Checkpoint folder life cycle in one gloo process: keep-last-K, a crash mid-save, clear errors."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.multiprocess import run_ranks


def _lifecycle(rank: int, world: int, root: str):
    from carft_nemo.checkpoint.dist_checkpoint import (
        CheckpointError,
        find_latest_checkpoint,
        list_checkpoints,
        load_checkpoint,
        save_checkpoint,
    )
    from carft_nemo.distributed.layout import ParallelConfig, initialize
    from carft_nemo.models.config import ModelConfig
    from carft_nemo.models.gpt import build_gpt_model

    parallel = ParallelConfig()
    initialize(parallel, seed=0)
    cfg = ModelConfig(preset="micro", vocab_size=64)
    model = build_gpt_model(cfg, parallel)
    out: dict[str, object] = {}
    for step in (1, 2, 3):
        save_checkpoint(root, step, {"policy": model}, data_state={"position": step}, keep_last=2)
    out["after_keep_last"] = [s for s, _ in list_checkpoints(root)]
    try:  # a crash mid-save: the common state cannot be pickled after the shards were planned
        save_checkpoint(root, 4, {"policy": model}, data_state={"position": 4, "bad": lambda: None}, keep_last=2)
        out["crash"] = "no exception"
    except Exception as err:  # noqa: BLE001 - any failure is the crash we simulate
        out["crash"] = type(err).__name__
    out["tmp_left"] = (Path(root) / ".tmp-step_4").is_dir()
    out["latest"] = find_latest_checkpoint(root).name
    out["resumed_step"] = load_checkpoint(root, {"policy": build_gpt_model(cfg, parallel)}).step
    errors = {}
    for name, call in {
        "incomplete": lambda: load_checkpoint(Path(root) / ".tmp-step_4", {"policy": model}),
        "missing": lambda: load_checkpoint(Path(root) / "step_9", {"policy": model}),
        "empty_root": lambda: load_checkpoint(Path(root) / "nothing_here", {"policy": model}),
        "wrong_group": lambda: load_checkpoint(root, {"critic": model}),
        "wrong_shape": lambda: load_checkpoint(
            root, {"policy": build_gpt_model(ModelConfig(preset="micro", vocab_size=64, hidden_size=32), parallel)}
        ),
    }.items():
        try:
            call()
            errors[name] = "no error"
        except CheckpointError as err:
            errors[name] = str(err)
    out["errors"] = errors
    return out


def test_keep_last_crash_and_errors(tmp_path: Path) -> None:
    (out,) = run_ranks(_lifecycle, 1, str(tmp_path))
    assert out["after_keep_last"] == [2, 3]
    assert out["crash"] != "no exception"
    assert out["latest"] == "step_3" and out["resumed_step"] == 3
    assert not (tmp_path / "step_4").exists()
    errors = out["errors"]
    assert "incomplete" in errors["incomplete"] and ".tmp-step_4" in errors["incomplete"]
    assert "does not exist" in errors["missing"] and "step_9" in errors["missing"]
    assert "no complete checkpoint" in errors["empty_root"]
    assert "critic" in errors["wrong_group"]
    assert "could not load" in errors["wrong_shape"] and "step_3" in errors["wrong_shape"]


def _back_to_before_the_first_update(rank: int, world: int, root: str):
    """A model saved before its first update (the actor during the critic's warm-up), updated, then
    loaded again: the weights and the LR schedule return, and Adam's moments go back to none."""
    from carft_nemo.checkpoint.dist_checkpoint import load_checkpoint, save_checkpoint
    from carft_nemo.distributed.layout import ParallelConfig, initialize, shutdown
    from carft_nemo.models.config import ModelConfig
    from carft_nemo.models.forward import unwrap
    from carft_nemo.models.gpt import build_gpt_model
    from carft_nemo.models.logprobs import token_logprobs
    from carft_nemo.training.forward_backward import run_forward_backward
    from carft_nemo.training.optim import OptimConfig, make_trainable

    cfg = ModelConfig(preset="micro", vocab_size=64)
    initialize(ParallelConfig(), seed=3, num_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
               num_query_groups=cfg.num_query_groups)  # fmt: skip
    try:
        trainable = make_trainable(build_gpt_model(cfg, ParallelConfig()), cfg, ParallelConfig(),
                                   OptimConfig(lr=1e-2, warmup_steps=5), 20)  # fmt: skip
        tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
        before = {k: v.clone() for k, v in unwrap(trainable.model).state_dict().items() if torch.is_tensor(v)}
        save_checkpoint(root, 5, {"policy": trainable})

        def loss_fn(logits, micro):
            return -token_logprobs(logits, micro["labels"]).sum(), {}

        for _ in range(2):
            trainable.zero_grad()
            run_forward_backward(trainable.model, {"tokens": tokens, "labels": tokens}, loss_fn=loss_fn,
                                 normalizer=1.0, micro_batch_size=2)  # fmt: skip
            trainable.step()
        moved = trainable.lr
        info = load_checkpoint(f"{root}/step_5", {"policy": trainable})
        after = {k: v for k, v in unwrap(trainable.model).state_dict().items() if torch.is_tensor(v)}
        same = all(torch.equal(before[k], after[k]) for k in before)
        inner = trainable.optimizer.optimizer
        return same, len(inner.state), info.restored_optimizer, moved, trainable.lr
    finally:
        shutdown()


def test_loading_a_checkpoint_from_before_the_first_update(tmp_path: Path) -> None:
    ((same, moments, restored, moved_lr, lr),) = run_ranks(_back_to_before_the_first_update, 1, str(tmp_path))
    assert same and restored
    assert moments == 0  # not the moments of the two updates after the save
    assert lr < moved_lr  # the warm-up schedule is back at its saved step
