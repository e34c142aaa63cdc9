"""The run report: a markdown page with the results table and PNG learning curves.

Built only from files the stages wrote (``metrics.jsonl``, ``summary.json``), so it can be
redrawn after a crash or for a finished run, or drawn for runs made apart (several
``recipes/rl.py`` runs side by side): ``python recipes/report.py OUTPUT_DIR`` or
``python recipes/report.py --out DIR NAME=RUN_DIR ...``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carft_nemo.evaluation.metrics import paired_change
from carft_nemo.evaluation.runner import read_correctness
from carft_nemo.reporting.markdown import table
from carft_nemo.reporting.plots import plot_curves
from carft_nemo.telemetry.run_log import read_metrics


@dataclass
class StageResult:
    """One stage's outputs as the report shows them."""

    name: str  # "sft", "reft", "carft", ...
    out_dir: Path
    step_offset: int = 0  # x of this stage's step 0 in the curves (an RL stage: the SFT step it starts from)

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.out_dir / "metrics.jsonl")

    @property
    def summary(self) -> dict[str, Any]:
        path = self.out_dir / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def series(self, key: str) -> list[tuple[float, float]]:
        return [(r["step"] + self.step_offset, r[key]) for r in self.metrics if isinstance(r.get(key), (int, float))]

    @property
    def guard_events(self) -> list[dict[str, Any]]:
        """The collapse guard's rollbacks and stop (``collapse_guard.json``: there even after a crash)."""
        path = self.out_dir / "collapse_guard.json"
        return json.loads(path.read_text()).get("events", []) if path.is_file() else []


def _is_run_dir(path: Path) -> bool:
    return (path / "summary.json").is_file() or (path / "metrics.jsonl").is_file()


def stages_of(specs: list[str]) -> list[StageResult]:
    """Stages from command-line specs: ``NAME=RUN_DIR`` each, or one main-job output folder.

    A main-job folder gives its stage subfolders (``sft`` first, then by name). A folder that
    holds neither ``summary.json`` nor ``metrics.jsonl`` is an error naming it.
    """
    if len(specs) == 1 and "=" not in specs[0]:
        root = Path(specs[0])
        children = (
            sorted(
                (d for d in root.iterdir() if d.is_dir() and _is_run_dir(d)), key=lambda d: (d.name != "sft", d.name)
            )
            if root.is_dir()
            else []
        )
        if not children:
            raise FileNotFoundError(f"{root}: no stage folders (with summary.json or metrics.jsonl) in it")
        return [StageResult(d.name, d) for d in children]
    stages = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"{spec!r}: expected NAME=RUN_DIR")
        if not _is_run_dir(Path(folder)):
            raise FileNotFoundError(f"{spec}: {folder} holds no summary.json or metrics.jsonl")
        stages.append(StageResult(name, Path(folder)))
    return stages


def _fmt(value: Any) -> str:
    return "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def _fmt_change(change: Any) -> str:
    """``+fixed / -broken (p)`` from a summary's ``held_out_change``."""
    if not isinstance(change, dict):
        return "n/a"
    return f"+{change['fixed']} / -{change['broken']} (p={change['sign_test_p']:.2g})"


CURVES = {
    "loss.png": ("training loss", "loss", 5),
    "eval_accuracy.png": ("held-out accuracy (greedy)", "eval_accuracy", 1),
    "reward.png": ("mean training reward", "reward", 5),
}
# The CARFT diagnostics (rl/experience.py, workers/gradient_probe.py): run mean, then how to read it.
DIAGNOSTICS = [
    ("contrastive/grad_ratio", "gradient norm, contrastive over policy loss"),
    ("contrastive/grad_cosine", "cosine of the two gradients"),
    ("contrastive/cos_mean", "cos(z_ann, z_gen), mean over samples"),
    ("contrastive/cos_p10", "cos(z_ann, z_gen), 10th percentile"),
    ("contrastive/correct_under_clamp", "correct samples below the clamp (where v4 acts)"),
    ("contrastive/partial_reward_std", "spread (std) of 0.1 cos + 0.2 over wrong samples"),
]


def contrastive_section(out: Path, stages: list[StageResult]) -> list[str]:
    """Run means of the CARFT diagnostics per stage that logged them, and their curves."""
    rows = []
    for stage in stages:
        means = {k: [v for _, v in stage.series(k)] for k, _ in DIAGNOSTICS}
        if any(means.values()):
            rows.append([stage.name] + [f"{sum(v) / len(v):.4g}" if v else "n/a" for v in means.values()])
    if not rows:
        return []
    lines = [
        "## What the contrastive term did (run means)",
        "",
        table(["stage"] + [d for _, d in DIAGNOSTICS], rows),
        "",
    ]
    series = {
        f"{st.name} {label}": st.series(key)
        for st in stages
        for key, label in (("contrastive/grad_ratio", "grad ratio"), ("contrastive/cos_mean", "cos(z_ann, z_gen)"))
    }
    png = plot_curves(series, out / "contrastive.png", title="CARFT diagnostics per step", ylabel="value")
    if png is not None:
        lines += ["![CARFT diagnostics](contrastive.png)", ""]
    return lines


def versus_section(stages: list[StageResult], baseline: str = "reft") -> list[str]:
    """Each other RL stage's final answers against ``baseline``'s: fixed / broken and the exact McNemar p."""
    finals = {st.name: st.out_dir / "eval" / "final_predictions.jsonl" for st in stages if st.name != "sft"}
    finals = {name: path for name, path in finals.items() if path.is_file()}
    if baseline not in finals or len(finals) < 2:
        return []
    base = read_correctness(finals[baseline])
    rows = []
    for name, path in finals.items():
        if name != baseline:
            change = paired_change(base, read_correctness(path))
            rows.append([name, str(change.compared), _fmt_change(change.as_dict())])
    header = ["stage", "questions", f"answers fixed / broken against {baseline} (exact McNemar p)"]
    return [f"## Against {baseline}", "", table(header, rows), ""]


def guard_section(stages: list[StageResult]) -> list[str]:
    """One row per collapse-guard event of any stage (none: no section)."""
    rows = [
        [st.name, str(e["step"]), e["action"], e["rule"], e["detail"], str(e["to_step"]), f"{e['lr_scale']:g}"]
        for st in stages
        for e in st.guard_events
    ]
    if not rows:
        return []
    header = ["stage", "at step", "action", "rule", "figures", "back to step", "LR scale after"]
    return ["## Collapse guard", "", table(header, rows), ""]


def write_report(out_dir: str | Path, stages: list[StageResult], *, title: str, notes: list[str] = ()) -> Path:
    """Write ``report.md`` and its PNGs into ``out_dir``; returns the markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for stage in stages:
        s = stage.summary
        rows.append(
            [
                stage.name,
                _fmt(s.get("accuracy_before")),
                _fmt(s.get("accuracy_after")),
                _fmt_change(s.get("held_out_change")),
                _fmt(s.get("reward_first_steps")),
                _fmt(s.get("reward_last_steps")),
                _fmt(s.get("steps")),
                _fmt(s.get("wall_time_s")),
            ]
        )
    lines = [
        f"# {title}",
        "",
        "## Results",
        "",
        table(
            [
                "stage",
                "accuracy before",
                "accuracy after",
                "answers fixed / broken against the start (exact McNemar p)",
                "train reward, first 5 steps",
                "train reward, last 5 steps",
                "steps",
                "wall time (s)",
            ],
            rows,
        ),
        "",
    ]
    events = {f"{st.name} rollback": [e["step"] + st.step_offset for e in st.guard_events] for st in stages}
    events = {name: xs for name, xs in events.items() if xs}
    for filename, (label, key, smooth) in CURVES.items():
        series = {st.name: st.series(key) for st in stages}
        marked = events if key in ("eval_accuracy", "reward") else None
        png = plot_curves(series, out / filename, title=label, ylabel=key, smooth=smooth, events=marked)
        if png is not None:
            lines += [f"## {label.capitalize()}", "", f"![{label}]({filename})", ""]
    lines += versus_section(stages)
    lines += guard_section(stages)
    lines += contrastive_section(out, stages)
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
