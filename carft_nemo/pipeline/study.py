"""The reproduction study: SFT vs ReFT vs Dr.GRPO vs CARFT ablations, several seeds, on one task.

One SFT checkpoint (``shared_sft``, the default: as in the paper, every RL method starts
from the same SFT model, and the seeds vary the RL runs) or one SFT per seed; then for each
seed every RL method from that SFT checkpoint with that seed. Per run we keep the held-out
accuracy curve (greedy, every ``rl.eval_every`` steps, step 0 = the SFT model) and report
per method

- final held-out accuracy: mean, sample standard deviation, min and max over seeds;
- stability: the largest drop of held-out accuracy below its running best during RL
  (the running best starts at the SFT model's accuracy), mean and max over seeds;
- mean training reward over the last 5 steps.

The claims the paper makes are then checked mechanically (``claims`` in results.json and
the "What holds" table): a claim "holds" when the mean difference is positive and larger
than the pooled standard error of the two means, "points the same way" when positive but
within noise, and "does not hold" otherwise.

Every run resumes / is skipped when rerun (its summary.json exists), so a crashed study
continues where it stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carft_nemo.config import key_prefix, require, save_resolved
from carft_nemo.distributed.layout import shutdown
from carft_nemo.distributed.ray_group import shared_ray
from carft_nemo.reporting.markdown import table
from carft_nemo.reporting.plots import plot_curves
from carft_nemo.rl.config import RLConfig
from carft_nemo.rl.controller import run_rl, worker_cpus
from carft_nemo.sft.config import SFTConfig
from carft_nemo.sft.run import run_sft
from carft_nemo.telemetry.run_log import LOG, read_metrics
from carft_nemo.telemetry.timing import PhaseTimer


def _carft(mode: str, partial_reward: bool) -> Callable[[RLConfig], RLConfig]:
    def variant(base: RLConfig) -> RLConfig:
        cl = dataclasses.replace(base.contrastive, enabled=True, mode=mode, partial_reward=partial_reward)
        return dataclasses.replace(base, contrastive=cl)

    return variant


def _reft(base: RLConfig) -> RLConfig:
    return dataclasses.replace(base, contrastive=dataclasses.replace(base.contrastive, enabled=False))


def _grpo(base: RLConfig) -> RLConfig:
    """Dr.GRPO with the same number of samples per step as the PPO runs (questions / G)."""
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
    )
    return dataclasses.replace(base, rl=loop, contrastive=dataclasses.replace(base.contrastive, enabled=False))


METHODS: dict[str, Callable[[RLConfig], RLConfig]] = {
    "reft": _reft,
    "grpo": _grpo,
    "carft_positive": _carft("positive", False),
    "carft_negative": _carft("negative", False),
    "carft_both": _carft("both", False),
    "carft_both_partial_reward": _carft("both", True),
}


@dataclass
class StudyConfig:
    """``recipes/study.py --config configs/study-synthetic.yaml`` (or ``study-quick.yaml``)."""

    output_dir: str = "outputs/study"
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    shared_sft: bool = True  # one SFT (seed sft.train.seed) for all seeds; False: one SFT per seed
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)  # the ReFT settings every method starts from

    def __post_init__(self) -> None:
        require(bool(self.output_dir), "output_dir", "must be set")
        require(len(self.seeds) >= 1, "seeds", "give at least one seed")
        require(len(set(self.seeds)) == len(self.seeds), "seeds", f"repeated seeds in {self.seeds}")
        for m in self.methods:
            require(m in METHODS, "methods", f"unknown method {m!r}; choose from {sorted(METHODS)}")


def sft_dir(out: Path, seed: int, cfg: StudyConfig) -> Path:
    return out / "sft" if cfg.shared_sft else out / f"seed_{seed}" / "sft"


def _done(out: Path) -> bool:
    path = out / "summary.json"
    return path.is_file() and not json.loads(path.read_text()).get("stopped_early", False)


def run_study(cfg: StudyConfig) -> Path:
    """Run (or continue) every seed x method and write results.md / results.json / PNGs."""
    out = Path(cfg.output_dir)
    timer = PhaseTimer()
    save_resolved(cfg, out / "config.yaml")
    pending = {(seed, m) for seed in cfg.seeds for m in cfg.methods if not _done(out / f"seed_{seed}" / m)}
    with shared_ray(max((worker_cpus(METHODS[m](cfg.rl)) for _, m in pending), default=0), address=cfg.rl.ray_address):
        for seed in cfg.seeds:
            sft_cfg = copy.deepcopy(cfg.sft)
            sft_cfg.output_dir = str(sft_dir(out, seed, cfg))
            if not cfg.shared_sft:
                sft_cfg.train = dataclasses.replace(sft_cfg.train, seed=seed)
            if not _done(Path(sft_cfg.output_dir)):
                LOG.info("study: SFT, seed %d", seed)
                with key_prefix("sft"):
                    stopped = run_sft(sft_cfg)["stopped_early"]
                shutdown()
                if stopped:
                    raise SystemExit(0)  # a stop signal ends the study, not just this run: rerun to continue
            for method in cfg.methods:
                if (seed, method) not in pending:
                    continue
                run_out = out / f"seed_{seed}" / method
                base = dataclasses.replace(
                    cfg.rl,
                    sft_checkpoint=sft_cfg.output_dir,
                    output_dir=str(run_out),
                    rl=dataclasses.replace(cfg.rl.rl, seed=seed),
                )
                LOG.info("study: %s, seed %d", method, seed)
                with key_prefix("rl"):
                    stopped = run_rl(METHODS[method](base))["stopped_early"]
                if stopped:
                    raise SystemExit(0)
    results = collect_results(out, cfg.seeds, cfg.methods, shared_sft=cfg.shared_sft)
    results["wall_time_s_this_invocation"] = timer.elapsed()
    return write_results(out, results)


# ---------------------------------------------------------------------------- analysis


def eval_curve(run_dir: Path) -> list[tuple[int, float]]:
    """Held-out accuracy by step (step 0 = before RL), last value per step."""
    by_step: dict[int, float] = {}
    for row in read_metrics(run_dir / "metrics.jsonl"):
        if isinstance(row.get("eval_accuracy"), (int, float)):
            by_step[int(row["step"])] = float(row["eval_accuracy"])
    return sorted(by_step.items())


def largest_drop(curve: list[tuple[int, float]]) -> float:
    """max_t (max_{u <= t} acc_u - acc_t): how far accuracy fell below its running best."""
    best, drop = -math.inf, 0.0
    for _, acc in curve:
        best = max(best, acc)
        drop = max(drop, best - acc)
    return drop


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def collect_results(out: Path, seeds: list[int], methods: list[str], *, shared_sft: bool = False) -> dict[str, Any]:
    per_run: dict[str, dict[int, dict[str, Any]]] = {"sft": {}}
    for seed in seeds:
        sft_path = (out / "sft" if shared_sft else out / f"seed_{seed}" / "sft") / "summary.json"
        if not (shared_sft and per_run["sft"]):
            per_run["sft"][seed] = {
                "accuracy": json.loads(sft_path.read_text())["accuracy_after"],
                "largest_drop": None,
            }
        for method in methods:
            run_dir = out / f"seed_{seed}" / method
            if not _done(run_dir):
                continue  # an unfinished study reports what has finished (n per method in the table)
            summary = json.loads((run_dir / "summary.json").read_text())
            curve = eval_curve(run_dir)
            per_run.setdefault(method, {})[seed] = {
                "accuracy": summary["accuracy_after"],
                "largest_drop": largest_drop(curve),
                "reward_last_steps": summary["reward_last_steps"],
                "curve": curve,
                "wall_time_s": summary["wall_time_s"],
            }
    aggregate = {}
    for method, runs in per_run.items():
        accs = [r["accuracy"] for r in runs.values()]
        entry = {"accuracy": _stats(accs)}
        drops = [r["largest_drop"] for r in runs.values() if r["largest_drop"] is not None]
        if drops:
            entry["largest_drop"] = _stats(drops)
            entry["reward_last_steps"] = _stats([r["reward_last_steps"] for r in runs.values()])
        aggregate[method] = entry
    return {
        "seeds": seeds,
        "methods": methods,
        "shared_sft": shared_sft,
        "per_run": per_run,
        "aggregate": aggregate,
        "claims": check_claims(aggregate),
    }


def _compare(aggregate: dict, a: str, b: str, key: str, higher_is_better: bool = True) -> dict[str, Any] | None:
    if a not in aggregate or b not in aggregate or key not in aggregate[a] or key not in aggregate[b]:
        return None
    sa, sb = aggregate[a][key], aggregate[b][key]
    diff = (sa["mean"] - sb["mean"]) * (1 if higher_is_better else -1)
    se = math.sqrt(sa["std"] ** 2 / sa["n"] + sb["std"] ** 2 / sb["n"])
    verdict = "holds" if diff > se and diff > 0 else ("points the same way" if diff > 0 else "does not hold")
    return {"a": a, "b": b, "metric": key, "difference": diff, "standard_error": se, "verdict": verdict}


CLAIMS = [
    ("RL (ReFT) improves on SFT", "reft", "sft", "accuracy", True),
    ("CARFT (both signals + partial reward) beats ReFT", "carft_both_partial_reward", "reft", "accuracy", True),
    ("CARFT (both signals) beats ReFT", "carft_both", "reft", "accuracy", True),
    ("CARFT beats Dr.GRPO", "carft_both_partial_reward", "grpo", "accuracy", True),
    ("both signals beat the positive signal alone", "carft_both", "carft_positive", "accuracy", True),
    ("both signals beat the negative signal alone", "carft_both", "carft_negative", "accuracy", True),
    ("the partial reward helps", "carft_both_partial_reward", "carft_both", "accuracy", True),
    (
        "CARFT is more stable than ReFT (smaller largest drop)",
        "carft_both_partial_reward",
        "reft",
        "largest_drop",
        False,
    ),
]


def check_claims(aggregate: dict) -> list[dict[str, Any]]:
    out = []
    for text, a, b, key, higher in CLAIMS:
        cmp = _compare(aggregate, a, b, key, higher)
        if cmp is not None:
            out.append({"claim": text, **cmp})
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def write_results(out: Path, results: dict[str, Any]) -> Path:
    rows = []
    for method, agg in results["aggregate"].items():
        acc = agg["accuracy"]
        drop = agg.get("largest_drop")
        rew = agg.get("reward_last_steps")
        rows.append(
            [
                method,
                str(acc["n"]),
                f"{_pct(acc['mean'])} ± {_pct(acc['std'])}",
                f"{_pct(acc['min'])} – {_pct(acc['max'])}",
                f"{_pct(drop['mean'])} (max {_pct(drop['max'])})" if drop else "–",
                f"{rew['mean']:.3f}" if rew else "–",
            ]
        )
    claims = [
        [c["claim"], c["verdict"], f"{100 * c['difference']:+.1f}", f"{100 * c['standard_error']:.1f}"]
        for c in results["claims"]
    ]
    seeds = results["seeds"]
    sft_note = (
        "one SFT checkpoint shared by all seeds (the sft row is that single run)"
        if results.get("shared_sft")
        else "one SFT run per seed"
    )
    lines = [
        "# Reproduction study results",
        "",
        f"Seeds: {seeds}; {sft_note}. Held-out accuracy in % (greedy), mean ± sample std over seeds.",
        "",
        table(
            ["method", "runs", "final accuracy", "range", "largest drop below running best", "train reward (last 5)"],
            rows,
        ),
        "",
        "## What holds",
        "",
        "A claim holds when the mean difference is positive and larger than the standard error of the "
        "difference of the means (sqrt(sa^2/n + sb^2/n)); 'largest drop' differences are counted as "
        "improvements when smaller.",
        "",
        table(["claim", "verdict", "difference (points)", "standard error (points)"], claims),
        "",
    ]
    series = {}
    for method in results["methods"]:
        runs = results["per_run"].get(method, {})
        if not runs:
            continue
        steps = sorted({s for r in runs.values() for s, _ in r["curve"]})
        mean_curve = []
        for s in steps:
            vals = [dict(r["curve"]).get(s) for r in runs.values()]
            vals = [v for v in vals if v is not None]
            if len(vals) == len(runs):
                mean_curve.append((s, statistics.fmean(vals)))
        series[method] = mean_curve
    png = plot_curves(
        series,
        out / "accuracy_curves.png",
        title="held-out accuracy during RL (mean over seeds)",
        ylabel="accuracy",
        smooth=1,
    )
    if png is not None:
        lines += ["## Held-out accuracy during RL", "", "![accuracy](accuracy_curves.png)", ""]
    lines += [f"Wall time of this invocation: {results['wall_time_s_this_invocation'] / 60:.1f} min.", ""]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    path = out / "results.md"
    path.write_text("\n".join(lines))
    return path


__all__ = ["METHODS", "StudyConfig", "check_claims", "collect_results", "eval_curve", "largest_drop", "run_study"]
