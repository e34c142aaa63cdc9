"""The study's analysis: per run, per arm, and the paper's claims checked on paired answers.

Per run (arm x seed): final held-out accuracy; answers fixed / broken against the start
checkpoint and against ReFT of the same seed (the same questions, greedy), with McNemar's
exact test; the largest drop of held-out accuracy below its running best (the running best
starts at the start checkpoint's accuracy); the training reward of the last 5 steps; the run
means of the contrastive diagnostics (``contrastive/*`` metrics).

Per arm: mean, sample standard deviation and range of the final accuracy over seeds; the
fixed / broken counts summed over seeds with McNemar's test on the sums ("pooled": the seeds
answer the same questions, so this is a summary, not an independent-samples test); the
largest drop (mean, max); the diagnostics' means.

A claim "holds" when the pooled flips favour it with p < 0.05, "points the same way" when
they favour it without, and "does not hold" otherwise; a stability claim compares the mean
largest drops against their standard error and counts the runs that collapsed (fell at least
``COLLAPSE_POINTS`` below their running best). A claim whose arms have not finished every seed
gets no verdict ("incomplete"), whatever its partial numbers say.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from carft_nemo.evaluation.metrics import paired_change, sign_test_p
from carft_nemo.evaluation.runner import read_correctness
from carft_nemo.reporting.markdown import table
from carft_nemo.reporting.plots import plot_curves
from carft_nemo.telemetry.run_log import read_metrics

START = "start"  # the pseudo-arm of the start checkpoint in curves and tables
COLLAPSE_POINTS = 0.10  # a run collapsed when held-out accuracy fell this far below its running best


def eval_points(run_dir: Path, start_accuracy: float | None = None) -> list[tuple[int, float]]:
    """Every held-out evaluation in the order it ran (step 0 = the start, when given): a
    collapse-guard rollback evaluates a step again, and the fall it caught stays here."""
    points = [] if start_accuracy is None else [(0, start_accuracy)]
    for row in read_metrics(run_dir / "metrics.jsonl"):
        if isinstance(row.get("eval_accuracy"), (int, float)):
            points.append((int(row["step"]), float(row["eval_accuracy"])))
    return points


def last_per_step(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The curve drawn and averaged over seeds: the last evaluation of each step."""
    return sorted(dict(points).items())


def eval_curve(run_dir: Path, start_accuracy: float | None = None) -> list[tuple[int, float]]:
    """Held-out accuracy by step (step 0 = the start, when given), last value per step."""
    return last_per_step(eval_points(run_dir, start_accuracy))


def largest_drop(curve: list[tuple[int, float]]) -> float:
    """max_t (max_{u <= t} acc_u - acc_t): how far accuracy fell below its running best."""
    best, drop = -math.inf, 0.0
    for _, acc in curve:
        best = max(best, acc)
        drop = max(drop, best - acc)
    return drop


def diagnostic_means(run_dir: Path) -> dict[str, float]:
    """Run means of the ``contrastive/*`` metrics (steps where each was logged)."""
    sums: dict[str, list[float]] = {}
    for row in read_metrics(run_dir / "metrics.jsonl"):
        for key, value in row.items():
            if key.startswith("contrastive/") and isinstance(value, (int, float)) and math.isfinite(value):
                sums.setdefault(key, []).append(float(value))
    return {k: statistics.fmean(v) for k, v in sorted(sums.items())}


def _flips(before: dict[str, bool], after: dict[str, bool]) -> dict[str, Any]:
    return paired_change(before, after).as_dict()


def _run_record(run_dir: Path, start: dict[str, bool], start_accuracy: float) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    final = read_correctness(run_dir / "eval" / "final_predictions.jsonl")
    points = eval_points(run_dir, start_accuracy)
    return {
        "accuracy": summary["accuracy_after"],
        "vs_start": _flips(start, final),
        "largest_drop": largest_drop(points),  # falls the guard rolled back count
        "reward_last_steps": summary["reward_last_steps"],
        "curve": last_per_step(points),
        "diagnostics": diagnostic_means(run_dir),
        "wall_time_s": summary["wall_time_s"],
    }


def _done(run_dir: Path) -> bool:
    path = run_dir / "summary.json"
    return path.is_file() and not json.loads(path.read_text()).get("stopped_early", False)


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _pooled(flips: list[dict[str, Any]]) -> dict[str, Any]:
    fixed, broken = sum(f["fixed"] for f in flips), sum(f["broken"] for f in flips)
    return {"fixed": fixed, "broken": broken, "sign_test_p": sign_test_p(fixed, broken), "seeds": len(flips)}


def _aggregate(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "accuracy": _stats([r["accuracy"] for r in runs.values()]),
        "largest_drop": _stats([r["largest_drop"] for r in runs.values()]),
        "collapsed_runs": sum(r["largest_drop"] >= COLLAPSE_POINTS - 1e-9 for r in runs.values()),
        "reward_last_steps": _stats([r["reward_last_steps"] for r in runs.values()]),
        "vs_start": _pooled([r["vs_start"] for r in runs.values()]),
    }
    if all("vs_reft" in r for r in runs.values()):
        entry["vs_reft"] = _pooled([r["vs_reft"] for r in runs.values()])
    keys = sorted({k for r in runs.values() for k in r["diagnostics"]})
    entry["diagnostics"] = {
        k: statistics.fmean(r["diagnostics"][k] for r in runs.values() if k in r["diagnostics"]) for k in keys
    }
    return entry


def collect_results(out: Path, seeds: list[int], arms: list[str]) -> dict[str, Any]:
    """Every finished run under ``out`` (``seed_<s>/<arm>``) against the start evaluation."""
    start_summary = json.loads((out / "start" / "start_summary.json").read_text())
    start = read_correctness(out / "start" / "start_predictions.jsonl")
    per_run: dict[str, dict[int, dict[str, Any]]] = {}
    for seed in seeds:
        for arm in arms:
            run_dir = out / f"seed_{seed}" / arm
            if _done(run_dir):  # an unfinished study reports what has finished (n per arm in the table)
                per_run.setdefault(arm, {})[seed] = _run_record(run_dir, start, start_summary["accuracy"])
    for arm, runs in per_run.items():
        for seed, record in runs.items():
            reft_dir = out / f"seed_{seed}" / "reft"
            if arm != "reft" and "reft" in per_run and seed in per_run["reft"]:
                reft = read_correctness(reft_dir / "eval" / "final_predictions.jsonl")
                record["vs_reft"] = _flips(
                    reft, read_correctness(out / f"seed_{seed}" / arm / "eval" / "final_predictions.jsonl")
                )
    aggregate = {arm: _aggregate(runs) for arm, runs in per_run.items()}
    start_record = json.loads((out / "start.json").read_text()) if (out / "start.json").is_file() else {}
    return {
        "seeds": seeds,
        "arms": arms,
        "start": {**start_record, "accuracy": start_summary["accuracy"], "questions": start_summary["num_examples"]},
        "per_run": per_run,
        "aggregate": aggregate,
        "claims": check_claims(aggregate, start_summary["accuracy"], len(seeds)),
    }


CLAIMS = [
    ("RL (ReFT) improves on SFT", "reft", START),
    ("CARFT v4 (c_cl 0.1) beats ReFT", "carft_v4", "reft"),
    ("CARFT v4 (c_cl 0.01) beats ReFT", "carft_v4_c0.01", "reft"),
    ("CARFT v4 (c_cl 0.001) beats ReFT", "carft_v4_c0.001", "reft"),
    ("CARFT v9 (positive + negative) beats ReFT", "carft_v9", "reft"),
    ("CARFT v11 (v4 + partial reward) beats ReFT", "carft_v11", "reft"),
    ("CARFT v4 with gradient through the gather (ours) beats ReFT", "carft_v4_gather_grad", "reft"),
    ("CARFT v4 without the clamp (c_cl 0.1) beats ReFT", "carft_v4_unclamped", "reft"),
    ("CARFT v4 without the clamp (c_cl 0.01) beats ReFT", "carft_v4_unclamped_c0.01", "reft"),
    ("CARFT v4 beats Dr.GRPO (mean accuracy)", "carft_v4", "grpo"),
]


def _accuracy_claim(text: str, a: str, b: str, aggregate: dict, start_accuracy: float) -> dict[str, Any] | None:
    if a not in aggregate or (b != START and b not in aggregate):
        return None
    key = "vs_start" if b == START else f"vs_{b}"
    diff = aggregate[a]["accuracy"]["mean"] - (aggregate[b]["accuracy"]["mean"] if b != START else start_accuracy)
    pooled = aggregate[a].get(key)
    if pooled is None and b == START:
        return None
    if pooled is None:  # no paired comparison (Dr.GRPO is not paired): means and their standard error
        sa, sb = aggregate[a]["accuracy"], aggregate[b]["accuracy"]
        se = math.sqrt(sa["std"] ** 2 / sa["n"] + sb["std"] ** 2 / sb["n"])
        verdict = (
            "holds"
            if diff > se > 0 or (diff > 0 and se == 0)
            else ("points the same way" if diff > 0 else "does not hold")
        )
        return {"claim": text, "a": a, "b": b, "difference": diff, "standard_error": se, "verdict": verdict}
    verdict = (
        "holds"
        if pooled["fixed"] > pooled["broken"] and pooled["sign_test_p"] < 0.05
        else ("points the same way" if pooled["fixed"] > pooled["broken"] else "does not hold")
    )
    return {"claim": text, "a": a, "b": b, "difference": diff, **pooled, "verdict": verdict}


def _stability_claim(arm: str, aggregate: dict) -> dict[str, Any]:
    ca, re = aggregate[arm]["largest_drop"], aggregate["reft"]["largest_drop"]
    diff = re["mean"] - ca["mean"]  # positive: CARFT fell less far
    se = math.sqrt(ca["std"] ** 2 / ca["n"] + re["std"] ** 2 / re["n"])
    verdict = "holds" if diff > se and diff > 0 else ("points the same way" if diff > 0 else "does not hold")
    return {
        "claim": f"{arm} is more stable than ReFT (smaller largest drop)",
        "a": arm,
        "b": "reft",
        "difference": diff,
        "standard_error": se,
        "collapsed_runs": {arm: aggregate[arm]["collapsed_runs"], "reft": aggregate["reft"]["collapsed_runs"]},
        "verdict": verdict,
    }


def check_claims(aggregate: dict, start_accuracy: float, seeds: int) -> list[dict[str, Any]]:
    """The claims whose arms ran; accuracy claims on pooled flips, stability on the largest drop.

    Verdicts only where every arm of the claim finished all ``seeds`` seeds ("incomplete" else).
    """
    out = [c for text, a, b in CLAIMS if (c := _accuracy_claim(text, a, b, aggregate, start_accuracy)) is not None]
    if "reft" in aggregate:
        out += [_stability_claim(arm, aggregate) for arm in aggregate if arm.startswith("carft")]
    for claim in out:
        runs = [aggregate[arm]["accuracy"]["n"] for arm in (claim["a"], claim["b"]) if arm in aggregate]
        if min(runs) < seeds:
            claim["verdict"] = f"incomplete ({min(runs)} of {seeds} seeds)"
    return out


def _p(p: float) -> str:
    """A p-value as text; one that underflowed to 0 is below the smallest float."""
    return f"{p:.2g}" if p > 0 else "< 1e-300"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _arm_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for arm, agg in results["aggregate"].items():
        acc, drop = agg["accuracy"], agg["largest_drop"]
        vs_start, vs_reft = agg["vs_start"], agg.get("vs_reft")
        rows.append(
            [
                arm,
                str(acc["n"]),
                f"{_pct(acc['mean'])} ± {_pct(acc['std'])}",
                f"{_pct(acc['min'])} – {_pct(acc['max'])}",
                f"{vs_start['fixed']} / {vs_start['broken']} (p {_p(vs_start['sign_test_p'])})",
                f"{vs_reft['fixed']} / {vs_reft['broken']} (p {_p(vs_reft['sign_test_p'])})" if vs_reft else "–",
                f"{_pct(drop['mean'])} (max {_pct(drop['max'])})",
                f"{agg['collapsed_runs']} of {acc['n']}",
                f"{agg['reward_last_steps']['mean']:.3f}",
            ]
        )
    return rows


DIAGNOSTIC_COLUMNS = [
    ("contrastive/grad_ratio", "grad norm contrastive / policy", "{:.3g}"),
    ("contrastive/grad_cosine", "grad cosine", "{:+.3f}"),
    ("contrastive/cos_mean", "cos(z_ann, z_gen)", "{:.3f}"),
    ("contrastive/cos_p10", "p10", "{:.3f}"),
    ("contrastive/correct_under_clamp", "correct under clamp", "{:.2f}"),
    ("contrastive/partial_reward_std", "partial reward std", "{:.4f}"),
    ("contrastive/num_positive", "pairs / micro-batch", "{:.1f}"),
]


def _diagnostic_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for arm, agg in results["aggregate"].items():
        diag = agg["diagnostics"]
        if diag:
            rows.append([arm] + [fmt.format(diag[k]) if k in diag else "–" for k, _, fmt in DIAGNOSTIC_COLUMNS])
    return rows


def _mean_curves(results: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    series = {}
    for arm in results["arms"]:
        runs = results["per_run"].get(arm, {})
        steps = sorted({s for r in runs.values() for s, _ in r["curve"]})
        points = [(s, [dict(r["curve"]).get(s) for r in runs.values()]) for s in steps]
        series[arm] = [(s, statistics.fmean(v)) for s, v in points if v and None not in v]
    return series


def write_results(out: Path, results: dict[str, Any], title: str = "Reproduction study results") -> Path:
    """``results.json``, ``results.md`` (tables, claims) and ``accuracy_curves.png`` under ``out``."""
    start = results["start"]
    claims = [
        [
            c["claim"],
            c["verdict"],
            f"{100 * c['difference']:+.2f}" if math.isfinite(c["difference"]) else "–",
            f"{c['fixed']} / {c['broken']}, p {_p(c['sign_test_p'])}"
            if "fixed" in c
            else f"se {100 * c['standard_error']:.2f} points",
        ]
        for c in results["claims"]
    ]
    lines = [
        f"# {title}",
        "",
        f"Start: {start.get('checkpoint', '?')} (SFT evaluation {_pct(start.get('sft_eval_accuracy', math.nan))}%), "
        f"{_pct(start['accuracy'])}% on the {start['questions']} held-out questions every run is evaluated on "
        f"(greedy). Seeds {results['seeds']} vary the RL runs; accuracy in %, mean ± sample std over seeds.",
        "",
        table(
            [
                "arm",
                "runs",
                "final accuracy",
                "range",
                "fixed / broken vs start (pooled)",
                "fixed / broken vs ReFT (same seed, pooled)",
                "largest drop below running best",
                f"runs that fell >= {100 * COLLAPSE_POINTS:.0f} points",
                "train reward (last 5)",
            ],
            _arm_rows(results),
        ),
        "",
        "## Claims",
        "",
        table(["claim", "verdict", "difference (points)", "evidence"], claims),
        "",
    ]
    diagnostics = _diagnostic_rows(results)
    if diagnostics:
        lines += [
            "## What the contrastive term did (run means)",
            "",
            table(["arm"] + [name for _, name, _ in DIAGNOSTIC_COLUMNS], diagnostics),
            "",
        ]
    png = plot_curves(
        _mean_curves(results),
        out / "accuracy_curves.png",
        title="held-out accuracy during RL (mean over seeds)",
        ylabel="accuracy",
    )
    if png is not None:
        lines += ["## Held-out accuracy during RL", "", "![accuracy](accuracy_curves.png)", ""]
    if "wall_time_s_this_invocation" in results:
        lines += [f"Wall time of this invocation: {results['wall_time_s_this_invocation'] / 60:.1f} min.", ""]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    path = out / "results.md"
    path.write_text("\n".join(lines))
    return path


__all__ = [
    "CLAIMS",
    "check_claims",
    "collect_results",
    "diagnostic_means",
    "eval_curve",
    "largest_drop",
    "write_results",
]
