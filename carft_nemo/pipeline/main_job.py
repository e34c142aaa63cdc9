"""The main job: SFT, then the RL methods from the same SFT checkpoint, evaluation and a report.

    SFT (held-out accuracy before/after) -> ReFT, CARFT (and Dr.GRPO when listed in
    ``methods``), each from the same SFT checkpoint, each evaluated on the same held-out split
    -> report.md: comparison table, accuracy / reward / loss curves (one line per method; the
    RL stages continue from the SFT step they start at; collapse-guard rollbacks marked).

The RL start is the final SFT checkpoint, or with ``start_accuracy`` the evaluated SFT
checkpoint whose held-out accuracy is nearest it (as in the study: RL has room to help where
the model is right often enough to reinforce and wrong often enough to improve).

Every stage resumes from its own newest complete checkpoint when the command is rerun;
a finished stage (its ``summary.json`` exists and is not a preempted one) is not rerun.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from carft_nemo.algorithms.contrastive import ContrastiveConfig
from carft_nemo.config import key_prefix, require, save_resolved
from carft_nemo.distributed.layout import shutdown
from carft_nemo.distributed.ray_group import shared_ray
from carft_nemo.pipeline.study import check_start_candidates, pick_start
from carft_nemo.reporting.report import StageResult, write_report
from carft_nemo.rl.config import RLConfig, RLLoopConfig
from carft_nemo.rl.controller import run_rl, worker_cpus
from carft_nemo.sft.config import SFTConfig
from carft_nemo.sft.run import run_sft
from carft_nemo.telemetry.run_log import LOG
from carft_nemo.telemetry.timing import PhaseTimer

RL_METHODS = ("reft", "carft", "grpo")


@dataclass
class MainConfig:
    output_dir: str = "outputs/main"
    sft: SFTConfig = field(default_factory=SFTConfig)
    reft: RLConfig = field(default_factory=RLConfig)
    carft: RLConfig = field(default_factory=lambda: RLConfig(contrastive=ContrastiveConfig(enabled=True)))
    grpo: RLConfig = field(default_factory=lambda: RLConfig(rl=RLLoopConfig(algorithm="grpo", samples_per_question=8)))
    methods: list[str] = field(default_factory=lambda: ["reft", "carft"])  # RL stages, in order
    start_accuracy: float | None = None  # None: RL from the final SFT checkpoint (module docstring)

    def __post_init__(self) -> None:
        require(bool(self.output_dir), "output_dir", "must be set")
        if self.start_accuracy is not None:
            check_start_candidates(self.start_accuracy, self.sft.train)
        for m in self.methods:
            require(m in RL_METHODS, "methods", f"unknown method {m!r}; choose from {RL_METHODS}")
        for m in RL_METHODS:
            require(getattr(self, m).method == m, m, f"the {m} section configures {getattr(self, m).method}")


def _finished(summary_path: Path) -> bool:
    if not summary_path.is_file():
        return False
    return not json.loads(summary_path.read_text()).get("stopped_early", False)


def run_main(cfg: MainConfig) -> Path:
    """Run every stage into ``cfg.output_dir`` and return the report's path."""
    out = Path(cfg.output_dir)
    cfg.sft.output_dir = str(out / "sft")
    timer = PhaseTimer()
    save_resolved(cfg, out / "config.yaml")
    with key_prefix("sft"):
        summary = run_sft(cfg.sft)
    shutdown()
    if summary["stopped_early"]:
        raise SystemExit(0)  # preempted: rerun the command to resume
    stages = [StageResult("sft", out / "sft")]
    start = {"step": summary["steps"], "checkpoint": str(out / "sft")}
    if cfg.start_accuracy is not None:
        start = pick_start(out / "sft", cfg.start_accuracy)
        LOG.info("RL starts from %s (SFT held-out %.3f)", start["checkpoint"], start["sft_eval_accuracy"])
    (out / "rl_start.json").write_text(json.dumps(start, indent=2) + "\n")
    pending = [m for m in cfg.methods if not _finished(out / m / "summary.json")]
    with shared_ray(
        max((worker_cpus(getattr(cfg, m)) for m in pending), default=0),
        address=getattr(cfg, pending[0]).ray_address if pending else None,
    ):
        for method in cfg.methods:
            rl_cfg: RLConfig = getattr(cfg, method)
            rl_cfg.sft_checkpoint = start["checkpoint"]
            rl_cfg.output_dir = str(out / method)
            stages.append(StageResult(method, out / method, step_offset=start["step"]))
            if method not in pending:
                LOG.info("%s: finished earlier, not rerun", method)
                continue
            with key_prefix(method):
                if run_rl(rl_cfg)["stopped_early"]:
                    raise SystemExit(0)
    notes = [
        f"total wall time {timer.elapsed():.0f} s (this invocation; a resumed run counts only itself)",
        f"seed {cfg.sft.train.seed}; model preset {cfg.sft.model.preset}; resolved config: config.yaml",
        f"RL stages start from SFT step {start['step']} ({start['checkpoint']}); an RL stage's 'accuracy before' "
        "and its answers fixed / broken are against that checkpoint, on the RL stages' held-out questions",
        f"SFT checkpoints: {summary['final_checkpoint']}",
    ]
    report = write_report(out, stages, title="carft-nemo main job", notes=notes)
    LOG.info("report: %s", report)
    return report
