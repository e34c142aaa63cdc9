"""CARFT step time over ReFT step time on the same model and prompts, measured in one run; plus Dr.GRPO.

Three :class:`~carft_nemo.rl.controller.RLRun` s from ``configs/{reft,carft,grpo}-tiny-synthetic.yaml``
(CARFT as its costliest variant, v9, without the gradient probe)
start from the same SFT checkpoint with the same seed and step settings, so step ``r`` of
each draws the same questions (``BatchSchedule`` is a function of seed and step). One Ray
cluster holds all three runs' workers at once (an idle worker uses no CPU) and the steps
are interleaved: round ``r`` runs step ``r`` of every method, in an order that rotates from
round to round, so that load on the shared host drifts into all methods alike. Round 0
is a warm-up; the medians of the measured rounds are compared. Dr.GRPO (reported only, not
compared to the goal) runs every third round.

* ``carft_over_reft_step_time``: median CARFT step / median ReFT step (wall, total);
  ``carft_over_reft_paired_median``: median over rounds of the per-round ratio;
  ``carft_over_reft_cpu_time``: the same for the CPU seconds of all the run's processes
  (the host's cores are shared: other jobs stretch wall time, hardly CPU time; but CPU
  time adds up actor and critic work that overlaps in wall time);
  ``carft_over_reft_actor_cpu_time``: the actor's alone, the critical path of a step.
  ``meets_goal`` is true / false when the three agree, null (inconclusive) otherwise.
* Breakdown: per-phase medians of both and their difference. CARFT adds, per step, a
  forward pass of the annotated CoTs on the actor (embeddings) and on the critic (values)
  (phases ``logprobs`` / ``critic``), the LCS of annotated vs sampled CoTs and the
  embedding partial reward on the controller (``controller``; timed directly by wrapping
  the controller's calls of ``lcs_split`` and ``pooled_embeddings`` /
  ``embedding_partial_reward``), and the contrastive loss in every micro-batch of the
  update (``training``). ``carft_extra_cpu_s`` has the same split in CPU seconds per
  stage and role (``experience_actor``: the annotated forward; ``training_actor``: the
  contrastive loss), which the host's load hardly disturbs.
* Dr.GRPO with the same number of questions samples ``samples_per_question`` (8) responses
  each, i.e. 8x the rollouts: reported per step (same questions) and per sample.

Results are recorded in ``benchmarks/results/carft_step.json``. Run from the repository root:

    python -m benchmarks.carft_step [--quick] [--model tiny]
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import parse_args, print_table, write_result
from benchmarks.ppo_step import (
    DEFAULT_CACHE,
    PHASES,
    StepSettings,
    ensure_sft,
    gpu_overrides,
    layout_of,
    load_now,
    machine_info,
    medians,
    rl_config,
    timed_step,
    worker_pids,
)

METHODS = {
    "reft": "configs/reft-tiny-synthetic.yaml",
    "carft": "configs/carft-tiny-synthetic.yaml",
    "grpo": "configs/grpo-tiny-synthetic.yaml",
}
GRPO_SAMPLES = 8
GOAL = 1.05
SETTINGS = {
    "full": StepSettings(questions=16, max_new_tokens=96, measured_steps=15),
    "quick": StepSettings(questions=8, max_new_tokens=32, measured_steps=3),
}
CARFT_EXTRA = ("lcs", "partial_reward")
# The costliest of the authors' trainers: v9 has both signals and the LCS (the default v4 has no
# LCS, v11 adds only the pooled cosines). The gradient probe is a diagnostic, timed apart.
CARFT_OVERRIDES = ["contrastive.variant=v9", "contrastive.diagnostics_every=0"]
# Dr.GRPO's step (GRPO_SAMPLES x the rollouts) is only reported, not compared to a goal: it runs every
# 3rd round (round 0 included), so the rounds that decide CARFT / ReFT can be many.
EVERY = {"grpo": 3}


def method_settings(settings: StepSettings, method: str) -> StepSettings:
    """Dr.GRPO keeps the questions and samples ``GRPO_SAMPLES`` responses to each."""
    return dataclasses.replace(settings, samples=GRPO_SAMPLES) if method == "grpo" else settings


class ControllerTimers:
    """Seconds spent in the controller's CARFT-only calls during a step (wraps the real functions)."""

    def __init__(self) -> None:
        from carft_nemo.algorithms import reward_shaping
        from carft_nemo.rl import experience

        self.seconds = {name: 0.0 for name in CARFT_EXTRA}
        self._restore = []
        for module, attr, name in (
            (experience, "lcs_split", "lcs"),
            (experience, "pooled_embeddings", "partial_reward"),
            (reward_shaping, "embedding_partial_reward", "partial_reward"),
        ):
            original = getattr(module, attr)
            setattr(module, attr, self._timed(original, name))
            self._restore.append((module, attr, original))

    def _timed(self, fn: Callable, name: str) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0

        return wrapper

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {name: 0.0 for name in CARFT_EXTRA}
        return out

    def close(self) -> None:
        for module, attr, original in self._restore:
            setattr(module, attr, original)


def build_runs(model: str, settings: StepSettings, cache: Path, sft_steps: int, tmp: Path) -> dict[str, Any]:
    """The three runs (not started) on one SFT checkpoint, same seed and questions per step."""
    from carft_nemo.rl.controller import RLRun

    sft = ensure_sft(model, cache, sft_steps)
    extra = gpu_overrides() if model == "llama_1b" else []
    runs = {}
    for method, config in METHODS.items():
        own = CARFT_OVERRIDES if method == "carft" else []
        runs[method] = RLRun(rl_config(config, sft, tmp / method, method_settings(settings, method), [*extra, *own]))
    return runs


def interleaved(runs: dict[str, Any], rounds: int, timers: ControllerTimers) -> dict[str, list[dict[str, float]]]:
    """Round r = step r of every run, order rotated per round; round 0 is a warm-up (dropped)."""
    names = list(runs)
    pids = {name: worker_pids(run) for name, run in runs.items()}
    records: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for r in range(rounds + 1):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in [n for n in order if r % EVERY.get(n, 1) == 0]:
            timers.take()
            rec = timed_step(runs[name], r, pids[name])
            rec.update(timers.take())
            print(
                f"round {r}{' (warm-up)' if r == 0 else ''} {name}: "
                + ", ".join(f"{k} {rec[k]:.2f}s" for k in PHASES + CARFT_EXTRA + ("cpu_total",)),
                flush=True,
            )
            if r:
                records[name].append(rec)
    return records


def summarize(records: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Ratios, per-phase wall deltas and per-stage CPU deltas (CARFT - ReFT) from the measured rounds."""
    med = {name: medians(recs) for name, recs in records.items()}
    reft, carft, grpo = med["reft"], med["carft"], med["grpo"]
    paired = [c["total"] / r["total"] for c, r in zip(records["carft"], records["reft"])]
    delta = {k: carft[k] - reft[k] for k in PHASES + CARFT_EXTRA}
    ratios = {
        "wall": carft["total"] / reft["total"],
        "cpu": carft["cpu_total"] / reft["cpu_total"],
        "actor_cpu": carft["cpu_actor"] / reft["cpu_actor"],
    }
    met = [r <= GOAL for r in ratios.values()]
    return {
        "carft_over_reft_step_time": ratios["wall"],
        "carft_over_reft_paired_median": statistics.median(paired),
        "carft_over_reft_per_round": paired,
        "carft_over_reft_cpu_time": ratios["cpu"],
        "carft_over_reft_actor_cpu_time": ratios["actor_cpu"],
        "goal": GOAL,
        # True / False when wall, total-CPU and actor-CPU ratios agree; None (inconclusive) otherwise
        "meets_goal": True if all(met) else False if not any(met) else None,
        "carft_extra_s": delta["total"],
        "carft_extra_by_phase_s": {
            k: delta[k] for k in ("generation", "logprobs", "critic", "inference", "controller", "training")
        },
        "carft_controller_s": {k: carft[k] for k in CARFT_EXTRA},
        "carft_extra_cpu_s": {k[4:]: carft[k] - reft.get(k, 0.0) for k in carft if k.startswith("cpu_")},
        "cpu_seconds_per_step": {
            name: {k: m[k] for k in m if k.startswith("cpu_") and k.count("_") == 1} for name, m in med.items()
        },
        "grpo_over_reft_step_time_same_questions": grpo["total"] / reft["total"],
        "grpo_over_reft_per_sample": (grpo["total"] / grpo["samples"]) / (reft["total"] / reft["samples"]),
        "grpo_over_reft_cpu_time_same_questions": grpo["cpu_total"] / reft["cpu_total"],
        "seconds_per_sample": {name: m["total"] / m["samples"] for name, m in med.items()},
        "median_s": med,
    }


def explain(s: dict[str, Any]) -> str:
    """Plain-words verdict: does the ratio meet the goal, and where does CARFT's extra time go."""
    by, cpu, rounds = s["carft_extra_by_phase_s"], s["carft_extra_cpu_s"], s["carft_over_reft_per_round"]
    verdict = {True: "meets", False: "MISSES", None: "is inconclusive on"}[s["meets_goal"]]
    head = (
        f"CARFT/ReFT {verdict} the goal <= {GOAL}: wall-time ratio of medians "
        f"{s['carft_over_reft_step_time']:.3f} (paired median {s['carft_over_reft_paired_median']:.3f}, "
        f"per round {min(rounds):.2f}..{max(rounds):.2f}), CPU-time ratio {s['carft_over_reft_cpu_time']:.3f}, "
        f"actor CPU-time ratio {s['carft_over_reft_actor_cpu_time']:.3f} (the actor is the critical path: it "
        "generates, runs the policy and reference passes and the larger update)"
    )
    where = (
        f"Extra CPU seconds per step: annotated forward passes in make_experience actor "
        f"{cpu.get('experience_actor', 0.0):+.2f}, critic {cpu.get('experience_critic', 0.0):+.2f}; "
        f"contrastive loss in the update actor {cpu.get('training_actor', 0.0):+.2f} (critic "
        f"{cpu.get('training_critic', 0.0):+.2f}, no CARFT work there); controller: LCS "
        f"{s['carft_controller_s']['lcs']:.3f} s, partial reward "
        f"{s['carft_controller_s']['partial_reward']:.3f} s; "
        f"generation actor {cpu.get('generation_actor', 0.0):+.2f} (none expected: same prompts and seed)"
    )
    wall = (
        f"Wall-time phase deltas (noisy on this shared host): logprobs {by['logprobs']:+.2f}s, critic "
        f"{by['critic']:+.2f}s, inference wall {by['inference']:+.2f}s, controller {by['controller']:+.2f}s, "
        f"training {by['training']:+.2f}s, generation {by['generation']:+.2f}s, total {s['carft_extra_s']:+.2f}s"
    )
    return f"{head}. {where}. {wall}."


def main() -> None:
    args = parse_args(
        "carft_step",
        __doc__.splitlines()[0],
        extra=lambda p: (
            p.add_argument("--model", default="tiny", help="model preset (llama_1b needs CUDA)"),
            p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="SFT checkpoints and run dirs"),
            p.add_argument("--sft-steps", type=int, default=2, help="SFT steps behind the RL start checkpoint"),
        ),
    )
    from carft_nemo.distributed.ray_group import shared_ray
    from carft_nemo.rl.controller import worker_cpus

    settings = SETTINGS["quick" if args.quick else "full"]
    args.cache.mkdir(parents=True, exist_ok=True)
    load_start = load_now()
    timers = ControllerTimers()
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        runs = build_runs(args.model, settings, args.cache, args.sft_steps, Path(tmp))
        # Both runs' workers side by side in one cluster.
        with shared_ray(
            sum(worker_cpus(run.cfg) for run in runs.values()), address=next(iter(runs.values())).cfg.ray_address
        ):
            try:
                for run in runs.values():
                    run.start_workers()
                records = interleaved(runs, settings.measured_steps, timers)
            finally:
                for run in runs.values():
                    run.stop_workers()
                timers.close()
    s = summarize(records)
    rows = [
        {
            "method": name,
            "samples": int(m["samples"]),
            "resp_len": m["response_length"],
            **{k: m[k] for k in PHASES},
            **{k: m[k] for k in CARFT_EXTRA},
            "s/sample": m["total"] / m["samples"],
            "cpu_s": m["cpu_total"],
        }
        for name, m in s["median_s"].items()
    ]
    print_table(rows)
    note = explain(s)
    print(note)
    print(
        f"Dr.GRPO, same {settings.questions} questions ({GRPO_SAMPLES} samples each): "
        f"{s['grpo_over_reft_step_time_same_questions']:.2f}x the ReFT step; per sample "
        f"{s['grpo_over_reft_per_sample']:.2f}x"
    )
    path = write_result(
        args.out,
        {
            "benchmark": "carft_step",
            "quick": args.quick,
            "model": args.model,
            "params": runs["reft"].model_cfg.num_parameters(),
            "configs": METHODS,
            "settings": {name: method_settings(settings, name).describe() for name in METHODS},
            "sft_steps": args.sft_steps,
            "layouts": {name: layout_of(run.cfg) for name, run in runs.items()},
            **{k: v for k, v in s.items() if k != "median_s"},
            "median_s": s["median_s"],
            "steps": records,
            "verdict": note,
            "machine": machine_info(),
            "load": {"start": load_start, "end": load_now()},
            "note": (
                "All three runs live in one Ray cluster and alternate step by step on the same questions "
                "(same seed and step index); 1 torch thread per worker, fp32 on CPU; the host's 2 cores are "
                "shared with other jobs (see load and load_1m per step). A few-step SFT start: responses are "
                "near-random (mean length: response_length) and (nearly) all wrong (accuracy), so CARFT's positive "
                "term has few or no correct samples; its cost hardly depends on that (masked pooling over the "
                "whole batch)."
            ),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
