"""The reproduction study: SFT, ReFT, Dr.GRPO and the authors' CARFT trainers from one start, several seeds.

1. **SFT** on the annotated data, evaluated and saved every ``sft.train.eval_every`` steps.
2. **The start**: the SFT checkpoint whose held-out accuracy (its own evaluation) is nearest
   ``start_accuracy``. RL only has room where the model is right often enough to reinforce
   and wrong often enough to improve (``docs/reft-tiny``: +1.6 to +3.75 points from 76-78%,
   nothing from 33% or 92%), so the start is picked by accuracy, not by step number.
3. **The start's evaluation** on the RL held-out set (``rl.eval_data``, ``rl.eval_examples``),
   once: every arm and seed is compared with it question by question.
4. **Every arm x seed** from that checkpoint (``ARMS``: ReFT, Dr.GRPO, CARFT v4 at three c_cl,
   v9, v11, and ours with gradient through the all-gather); the RL seed varies, the start does
   not, as in the paper. RL runs do not evaluate before their first step (step 3 did).
5. **Results** (:mod:`carft_nemo.pipeline.study_results`): final accuracy, answers fixed and
   broken against the start and against ReFT of the same seed with McNemar's exact test, the
   largest drop below the running best, the contrastive diagnostics' run means.

Every stage is skipped when rerun if it finished (a summary or result file exists), so a
crashed or preempted study continues where it stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from carft_nemo.config import key_prefix, require, save_resolved
from carft_nemo.distributed.layout import shutdown
from carft_nemo.distributed.ray_group import shared_ray
from carft_nemo.evaluation.recipe import EvalConfig, run_evaluation
from carft_nemo.pipeline.study_results import collect_results, write_results
from carft_nemo.rl.config import RLConfig
from carft_nemo.rl.controller import run_rl, worker_cpus
from carft_nemo.sft.config import SFTConfig
from carft_nemo.sft.run import run_sft
from carft_nemo.telemetry.run_log import LOG
from carft_nemo.telemetry.timing import PhaseTimer
from carft_nemo.training.loop import LoopSchedule

Arm = Callable[[RLConfig], RLConfig]


def _reft(base: RLConfig) -> RLConfig:
    return dataclasses.replace(base, contrastive=dataclasses.replace(base.contrastive, enabled=False))


def _reft_guarded(base: RLConfig) -> RLConfig:
    """ReFT with the collapse guard on (its defaults: rl/collapse_guard.py), where the study turns it off."""
    guard = dataclasses.replace(base.rl.collapse_guard, enabled=True)
    return _reft(dataclasses.replace(base, rl=dataclasses.replace(base.rl, collapse_guard=guard)))


def _grpo(base: RLConfig) -> RLConfig:
    """Dr.GRPO with the same number of samples per step as the PPO runs (questions / G); no critic, no KL."""
    group = 8
    require(
        base.rl.questions_per_step % group == 0,
        "rl.questions_per_step",
        f"Dr.GRPO in the study keeps samples per step: {base.rl.questions_per_step} must divide by {group}",
    )
    loop = dataclasses.replace(
        base.rl,
        algorithm="grpo",
        samples_per_question=group,
        questions_per_step=base.rl.questions_per_step // group,
        kl_coef=0.0,
        critic_warmup_steps=0,
    )
    return dataclasses.replace(base, rl=loop, contrastive=dataclasses.replace(base.contrastive, enabled=False))


def _carft(variant: str, coef: float, **extension: bool | float | None) -> Arm:
    def arm(base: RLConfig) -> RLConfig:
        cl = dataclasses.replace(base.contrastive, enabled=True, variant=variant, coef=coef, **extension)
        return dataclasses.replace(base, contrastive=cl)

    return arm


ARMS: dict[str, Arm] = {
    "reft": _reft,
    "reft_guarded": _reft_guarded,  # the stability study: does the guard stop a collapse from sticking?
    "grpo": _grpo,
    "carft_v4": _carft("v4", 0.1),  # the authors' paper trainer at their config class's c_cl
    "carft_v4_c0.01": _carft("v4", 0.01),
    "carft_v4_c0.001": _carft("v4", 0.001),  # their launcher's c_cl
    "carft_v9": _carft("v9", 0.1),  # + the negative signal
    "carft_v11": _carft("v11", 0.1),  # + the embedding-enhanced partial reward
    "carft_v4_gather_grad": _carft("v4", 0.1, gather_with_grad=True),  # ours: gradient through the gather
    # what the diagnostics pointed to (docs/study): with cos(z_ann, z_gen) ~ 0.99 every correct pair
    # sits above the 0.9 clamp and v4 sends no gradient at all; without the clamp the pull acts
    "carft_v4_unclamped": _carft("v4", 0.1, clamp_positive_similarity=None),
    "carft_v4_unclamped_c0.01": _carft("v4", 0.01, clamp_positive_similarity=None),
    # the pull at c_cl 2 is ~0.1x the policy gradient (docs/study/followup: 0.0056x at c_cl 0.1)
    "carft_v4_unclamped_c2": _carft("v4", 2.0, clamp_positive_similarity=None),
}
# the arms of configs/study-synthetic.yaml; the others are follow-ups (configs/study-followup.yaml)
PAPER_ARMS = [
    "reft",
    "grpo",
    "carft_v4",
    "carft_v4_c0.01",
    "carft_v4_c0.001",
    "carft_v9",
    "carft_v11",
    "carft_v4_gather_grad",
]


@dataclass
class StudyConfig:
    """``recipes/study.py --config configs/study-synthetic.yaml`` (or ``study-quick.yaml``)."""

    output_dir: str = "outputs/study"
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    arms: list[str] = field(default_factory=lambda: list(PAPER_ARMS))
    start_accuracy: float = 0.77  # RL starts from the SFT checkpoint whose held-out accuracy is nearest this
    # another study's output folder: take its SFT start (start.json) and the start's evaluation
    # instead of training SFT again (the stability study runs from the main study's start)
    reuse_start_from: str | None = None
    # arms whose finished runs in reuse_start_from are linked in, not rerun (the same RL settings!)
    reuse_runs: list[str] = field(default_factory=list)
    title: str = "Reproduction study results"  # the heading of results.md
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)  # the ReFT settings every arm starts from

    def __post_init__(self) -> None:
        require(bool(self.output_dir), "output_dir", "must be set")
        require(len(self.seeds) >= 1, "seeds", "give at least one seed")
        require(len(set(self.seeds)) == len(self.seeds), "seeds", f"repeated seeds in {self.seeds}")
        for arm in self.arms:
            require(arm in ARMS, "arms", f"unknown arm {arm!r}; choose from {sorted(ARMS)}")
        for arm in self.reuse_runs:
            require(arm in self.arms, "reuse_runs", f"{arm!r} is not one of arms")
        require(not self.reuse_runs or bool(self.reuse_start_from), "reuse_runs", "needs reuse_start_from")
        check_start_candidates(self.start_accuracy, self.sft.train)


def check_start_candidates(start_accuracy: float, train: LoopSchedule) -> None:
    """The SFT stage keeps an evaluated checkpoint at every evaluation, for :func:`pick_start`."""
    require(0 < start_accuracy < 1, "start_accuracy", f"must be in (0, 1), got {start_accuracy}")
    require(
        train.eval_every > 0 and train.save_every == train.eval_every,
        "sft.train.save_every",
        f"must equal sft.train.eval_every (> 0): the start is an evaluated checkpoint, got "
        f"save_every={train.save_every}, eval_every={train.eval_every}",
    )
    require(
        train.keep_checkpoints * train.save_every >= train.steps,
        "sft.train.keep_checkpoints",
        f"{train.keep_checkpoints} x save_every {train.save_every} < steps {train.steps}: candidates get pruned",
    )


def _done(out: Path) -> bool:
    path = out / "summary.json"
    return path.is_file() and not json.loads(path.read_text()).get("stopped_early", False)


def pick_start(sft_out: Path, target: float) -> dict:
    """The SFT checkpoint whose evaluation is nearest ``target`` (the earlier one on a tie)."""
    candidates = []
    for summary in sorted((sft_out / "eval").glob("step_*_summary.json")) + [sft_out / "eval" / "final_summary.json"]:
        if not summary.is_file():
            continue
        step = (
            json.loads((sft_out / "summary.json").read_text())["steps"]
            if summary.name.startswith("final")
            else int(summary.name.split("_")[1])
        )
        path = sft_out / "checkpoints" / f"step_{step}"
        if path.is_dir():
            candidates.append((abs(json.loads(summary.read_text())["accuracy"] - target), step, summary, path))
    require(bool(candidates), "sft", f"no evaluated checkpoint under {sft_out} to start RL from")
    _, step, summary, path = min(candidates, key=lambda c: (c[0], c[1]))
    return {"step": step, "sft_eval_accuracy": json.loads(summary.read_text())["accuracy"], "checkpoint": str(path)}


def evaluate_start(cfg: StudyConfig, start: dict, out: Path) -> Path:
    """The start checkpoint on the RL held-out set (once); returns its predictions file."""
    predictions = out / "start_predictions.jsonl"
    if predictions.is_file():
        return predictions
    rl = cfg.rl
    eval_cfg = EvalConfig(
        checkpoint=start["checkpoint"],
        tokenizer=str(Path(start["checkpoint"]).parents[1] / "tokenizer"),  # <sft>/checkpoints/step_N
        output_dir=str(out),
        name="start",
        data=dataclasses.replace(rl.eval_data, limit=rl.rl.eval_examples or None),
        encoding=rl.encoding,
        generation=rl.eval_generation,
        seed=rl.rl.seed,
    )
    with key_prefix("rl"):
        run_evaluation(eval_cfg)
    shutdown()
    return predictions


def _reused_start(cfg: StudyConfig, out: Path) -> dict:
    """The start of the study in ``cfg.reuse_start_from``, its evaluation copied beside this one's runs."""
    source = Path(cfg.reuse_start_from)
    require(
        (source / "start.json").is_file() and (source / "start" / "start_predictions.jsonl").is_file(),
        "reuse_start_from",
        f"{source} holds no finished study start (start.json and start/start_predictions.jsonl)",
    )
    start = json.loads((source / "start.json").read_text())
    if not (out / "start").is_dir():
        shutil.copytree(source / "start", out / "start")
    (out / "start.json").write_text(json.dumps({**start, "reused_from": str(source)}, indent=2) + "\n")
    for seed in cfg.seeds:
        for arm in cfg.reuse_runs:
            here, there = out / f"seed_{seed}" / arm, (source / f"seed_{seed}" / arm).resolve()
            if not here.exists() and _done(there):
                here.parent.mkdir(parents=True, exist_ok=True)
                here.symlink_to(there, target_is_directory=True)
    LOG.info("study: RL starts from %s, the start of %s", start["checkpoint"], source)
    return start


def _sft_stage(cfg: StudyConfig, out: Path) -> dict:
    """SFT (unless done), then the start it offers; ``start.json`` records the choice."""
    if cfg.reuse_start_from:
        return _reused_start(cfg, out)
    sft_cfg = copy.deepcopy(cfg.sft)
    sft_cfg.output_dir = str(out / "sft")
    if not _done(out / "sft"):
        LOG.info("study: SFT")
        with key_prefix("sft"):
            stopped = run_sft(sft_cfg)["stopped_early"]
        shutdown()
        if stopped:
            raise SystemExit(0)  # a stop signal ends the study, not just this run: rerun to continue
    start = pick_start(out / "sft", cfg.start_accuracy)
    (out / "start.json").write_text(json.dumps(start, indent=2) + "\n")
    LOG.info("study: RL starts from %s (SFT eval accuracy %.3f)", start["checkpoint"], start["sft_eval_accuracy"])
    return start


def run_study(cfg: StudyConfig) -> Path:
    """Run (or continue) every stage and arm x seed; write results.md / results.json / PNGs."""
    out = Path(cfg.output_dir)
    timer = PhaseTimer()
    save_resolved(cfg, out / "config.yaml")
    start = _sft_stage(cfg, out)
    evaluate_start(cfg, start, out / "start")
    pending = [(seed, arm) for seed in cfg.seeds for arm in cfg.arms if not _done(out / f"seed_{seed}" / arm)]
    with shared_ray(max((worker_cpus(ARMS[a](cfg.rl)) for _, a in pending), default=0), address=cfg.rl.ray_address):
        for seed, arm in pending:
            base = dataclasses.replace(
                cfg.rl,
                sft_checkpoint=start["checkpoint"],
                output_dir=str(out / f"seed_{seed}" / arm),
                rl=dataclasses.replace(cfg.rl.rl, seed=seed, eval_before=False),
            )
            LOG.info("study: %s, seed %d", arm, seed)
            with key_prefix("rl"):
                stopped = run_rl(ARMS[arm](base))["stopped_early"]
            if stopped:
                raise SystemExit(0)
    results = collect_results(out, cfg.seeds, cfg.arms)
    results["wall_time_s_this_invocation"] = timer.elapsed()
    return write_results(out, results, title=cfg.title)


__all__ = ["ARMS", "PAPER_ARMS", "StudyConfig", "evaluate_start", "pick_start", "run_study"]
