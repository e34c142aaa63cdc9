"""Wall time of one PPO (ReFT) step by phase, through the real RL controller on Ray.

For each model: a few SFT steps make a checkpoint (quality does not matter for timing;
cached under ``--cache``), then one :class:`~carft_nemo.rl.controller.RLRun` built from
``configs/reft-tiny-synthetic.yaml`` starts its workers once (actor, separate critic,
reward pool; reference in ``swap`` mode), runs one warm-up step and ``K`` measured steps
exactly as ``RLRun.run`` does (generate -> make_experience -> train), and reports the
median seconds per phase:

* ``generation``: sampling the rollout on the actor;
* ``logprobs`` / ``critic`` / ``reward``: the overlapped inference phase (actor log-probs
  + reference log-probs on the actor / critic values / answer checking); they run in
  parallel, so ``inference`` (their wall time) is less than their sum;
* ``controller``: the driver's own work in make_experience after the inference phase
  (decoding, KL-in-reward, GAE, whitening; LCS and partial reward for CARFT);
* ``training``: actor and critic updates (concurrent);
* ``total``: generate + make_experience + train, wall;
* ``cpu_<role>`` / ``cpu_total``: CPU seconds the step took in each role's processes and
  in the driver (the host's 2 cores are shared with other jobs, which stretches wall
  time but hardly CPU time).

On CPU the models are ``tiny`` and ``small_100m`` (its preset's 16k-row vocabulary, though
the synthetic task's word-level tokenizer uses few of the ids). With CUDA, ``llama_1b`` is
added (one GPU: the shared value head layout, since a separate critic needs its own GPU).
One optimizer step per PPO epoch over the rollout, as ``configs/reft-tiny-synthetic.yaml``.

Results are recorded in ``benchmarks/results/ppo_step.json``. Run from the repository root:

    python -m benchmarks.ppo_step [--quick]     # --quick: tiny only, 8 questions x 32 tokens
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import parse_args, print_table, write_result

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "carft_nemo_bench"
PHASES = ("generation", "logprobs", "critic", "reward", "inference", "controller", "training", "total")


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What one RL step does: ``questions`` x ``samples`` rollouts of up to ``max_new_tokens``.

    One optimizer step per PPO epoch over the whole rollout (mini-batch = rollout), as the
    tiny RL configs and the paper's code do; micro-batches of up to 16 sequences.
    """

    questions: int
    max_new_tokens: int
    measured_steps: int  # after one warm-up step
    samples: int = 1

    @property
    def rollout(self) -> int:
        return self.questions * self.samples

    @property
    def micro_batch(self) -> int:
        return math.gcd(16, self.rollout)

    def overrides(self) -> list[str]:
        return [
            f"rl.questions_per_step={self.questions}",
            f"rl.samples_per_question={self.samples}",
            f"rl.mini_batch_size={self.rollout}",
            f"generation.max_new_tokens={self.max_new_tokens}",
            f"actor.micro_batch_size={self.micro_batch}",
            f"critic.micro_batch_size={self.micro_batch}",
            f"rl.steps={self.measured_steps + 1}",
            "rl.eval_examples=8",
        ]

    def describe(self) -> dict[str, int]:
        return {
            "questions_per_step": self.questions,
            "samples_per_question": self.samples,
            "rollout_samples": self.rollout,
            "max_new_tokens": self.max_new_tokens,
            "mini_batch_size": self.rollout,
            "micro_batch_size": self.micro_batch,
            "measured_steps": self.measured_steps,
            "warmup_steps": 1,
        }


# model -> settings for a full / quick run (CPU models measured on a shared 2-core host)
SETTINGS = {
    "tiny": {"full": StepSettings(32, 96, 3), "quick": StepSettings(8, 32, 2)},
    "small_100m": {"full": StepSettings(8, 64, 2), "quick": StepSettings(4, 16, 1)},
    "llama_1b": {"full": StepSettings(32, 256, 3), "quick": StepSettings(8, 64, 2)},
}


# ---------------------------------------------------------------------------- set-up


def ensure_sft(preset: str, cache: Path, steps: int = 2) -> Path:
    """An SFT output dir (checkpoints/ + tokenizer/) of ``preset`` after ``steps`` steps; reused if present.

    The model keeps its preset's vocabulary (``small_100m``: 16k, ``llama_1b``: 32k rows)
    though the synthetic task's word-level tokenizer has far fewer ids: the embedding and
    output layer cost what they would with a real tokenizer (``tiny`` takes the tokenizer's).
    """
    out = cache / f"sft-{preset}-{steps}steps"
    if (out / "summary.json").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        str(ROOT / "recipes" / "sft.py"),
        "--config",
        str(ROOT / "configs" / "sft-tiny-synthetic.yaml"),
        f"output_dir={out}",
        f"model.preset={preset}",
        f"train.steps={steps}",
        "train.eval_before=false",
        "train.eval_every=0",
        "train.eval_examples=4",
        "train.global_batch_size=8",
        "train.micro_batch_size=8",
        "generation.max_new_tokens=8",
    ]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
    print(f"SFT checkpoint for {preset}: {steps} steps -> {out}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not (out / "summary.json").exists():
        raise RuntimeError(f"SFT for {preset} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return out


def rl_config(config: str, sft_dir: Path, out_dir: Path, settings: StepSettings, extra: list[str] = ()):
    """The RLConfig of ``config`` with the benchmark's step settings."""
    from carft_nemo.config import load_config
    from carft_nemo.rl.config import RLConfig

    overrides = [f"sft_checkpoint={sft_dir}", f"output_dir={out_dir}", *settings.overrides(), *extra]
    return load_config(RLConfig, ROOT / config, overrides)


def gpu_overrides() -> list[str]:
    """One GPU holds one worker: a separate critic would wait forever for a second GPU."""
    import torch

    return [] if torch.cuda.device_count() >= 2 else ["critic.layout=shared"]


# ---------------------------------------------------------------------------- one step


def worker_pids(run) -> dict[str, list[int]]:
    """Process ids of a started run's workers by role (actor, critic, reference, reward)."""
    return {role: group.pids() for role, group in run.groups.items()}


def cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    """User + system CPU seconds so far of each role's processes (Linux /proc), and of this driver.

    CPU time is recorded beside wall time because this host's cores are shared: other
    jobs' load stretches wall time far more than the CPU work a step needs.
    """
    tick = os.sysconf("SC_CLK_TCK")
    out = {"driver": time.process_time()}
    for role, ids in pids.items():
        total = 0.0
        for pid in ids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15)
            except (OSError, IndexError, ValueError):
                pass
        out[role] = total
    return out


def timed_step(run, step: int, pids: dict[str, list[int]] | None = None) -> dict[str, float]:
    """One step as ``RLRun.run`` does it: seconds per phase, CPU seconds per role and phase, step metrics.

    CPU keys: ``cpu_<role>`` (whole step), ``cpu_total``, and ``cpu_<stage>_<role>`` for the
    stages ``generation``, ``experience`` (make_experience: inference + controller) and ``training``.
    """
    from carft_nemo.telemetry.timing import PhaseTimer

    timer = PhaseTimer()
    pids = pids or worker_pids(run)
    cpu = [cpu_seconds(pids)]
    with timer.phase("generation"):
        sample_q, rollout = run.generate(step)
    cpu.append(cpu_seconds(pids))
    with timer.phase("experience"):
        exp, metrics = run.make_experience(sample_q, rollout, timer)
    cpu.append(cpu_seconds(pids))
    run.update(step, exp, timer)
    phases = dict(timer.seconds)
    phases["total"] = timer.elapsed()
    exp_s = phases.pop("experience")
    cpu.append(cpu_seconds(pids))
    phases["inference"] = max(phases["logprobs"], phases["critic"], phases["reward"])
    phases["controller"] = max(exp_s - phases["inference"], 0.0)
    for role in cpu[0]:
        phases[f"cpu_{role}"] = cpu[-1][role] - cpu[0][role]
        for i, stage in enumerate(("generation", "experience", "training")):
            phases[f"cpu_{stage}_{role}"] = cpu[i + 1][role] - cpu[i][role]
    phases["cpu_total"] = sum(cpu[-1][role] - cpu[0][role] for role in cpu[0])
    phases["load_1m"] = os.getloadavg()[0]
    phases["samples"] = float(len(sample_q))
    phases["response_length"] = metrics["response_length"]
    phases["accuracy"] = metrics["accuracy"]
    phases["sequence_length"] = float(exp.tokens.shape[1])
    return phases


def medians(steps: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(s[k] for s in steps) for k in steps[0]}


def layout_of(cfg) -> dict[str, Any]:
    """Workers and TP/PP/DP of each role of an RLConfig (critic: separate group, shared head or none)."""
    if cfg.uses_critic_group:
        critic = {"layout": "separate", "workers": cfg.critic.num_workers, **dataclasses.asdict(cfg.critic.parallel)}
    else:
        critic = {"layout": "shared" if cfg.uses_shared_value_head else "none"}
    return {
        "actor": {"workers": cfg.actor.num_workers, **dataclasses.asdict(cfg.actor.parallel)},
        "critic": critic,
        "reference": cfg.reference.mode if cfg.rl.kl_coef > 0 else "none",
        "reward_workers": cfg.reward.num_workers,
    }


# ---------------------------------------------------------------------------- host facts


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, torch version, device, and the current ``uptime`` line."""
    import torch

    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    mem_gib = None
    try:
        kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
        mem_gib = round(kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def load_now() -> dict[str, Any]:
    """Load averages (1, 5, 15 min) and the ``uptime`` line: other jobs share this host."""
    try:
        line = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        line = ""
    return {"load_avg": [round(x, 2) for x in os.getloadavg()], "uptime": line}


# ---------------------------------------------------------------------------- the benchmark


def bench_model(model: str, settings: StepSettings, cache: Path, sft_steps: int) -> dict[str, Any]:
    """Start one ReFT run's workers, warm up one step, time ``settings.measured_steps``."""
    from carft_nemo.distributed.ray_group import shared_ray
    from carft_nemo.rl.controller import RLRun, worker_cpus

    sft = ensure_sft(model, cache, sft_steps)
    extra = gpu_overrides() if model == "llama_1b" else []
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cfg = rl_config("configs/reft-tiny-synthetic.yaml", sft, Path(tmp), settings, extra)
        run = RLRun(cfg)
        # A cluster of this model's own: the next model's workers may need another size.
        with shared_ray(worker_cpus(cfg), address=cfg.ray_address):
            t0 = time.perf_counter()
            try:
                run.start_workers()
                startup = time.perf_counter() - t0
                pids = worker_pids(run)
                steps = []
                for step in range(settings.measured_steps + 1):
                    record = timed_step(run, step, pids)
                    print(
                        f"{model} step {step}{' (warm-up)' if step == 0 else ''}: "
                        + ", ".join(f"{k} {record[k]:.2f}s" for k in PHASES + ("cpu_total",)),
                        flush=True,
                    )
                    if step:
                        steps.append(record)
            finally:
                run.stop_workers()
    return {
        "model": model,
        "params": run.model_cfg.num_parameters(),
        "vocab_size": run.model_cfg.vocab_size,
        "settings": settings.describe(),
        "layout": layout_of(cfg),
        "workers_startup_s": startup,
        "median_s": medians(steps),
        "steps": steps,
        "sft_steps": sft_steps,
    }


def table_row(name: str, r: dict[str, Any]) -> dict[str, Any]:
    m = r["median_s"]
    return {
        "model": name,
        "params_M": r["params"] / 1e6,
        "samples": int(m["samples"]),
        "resp_len": m["response_length"],
        **{k: m[k] for k in PHASES},
        "cpu_s": m["cpu_total"],
    }


def main() -> None:
    import torch

    args = parse_args(
        "ppo_step",
        __doc__.splitlines()[0],
        extra=lambda p: (
            p.add_argument(
                "--models",
                nargs="+",
                default=None,
                help="presets (default: tiny small_100m, + llama_1b with CUDA; --quick: tiny)",
            ),
            p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="SFT checkpoints and run dirs"),
            p.add_argument("--sft-steps", type=int, default=2, help="SFT steps behind the RL start checkpoint"),
        ),
    )
    cuda = torch.cuda.is_available()
    models = args.models or (["tiny"] if args.quick else ["tiny", "small_100m"] + (["llama_1b"] if cuda else []))
    skipped = {}
    if "llama_1b" in models and not cuda:
        models.remove("llama_1b")
    if not cuda:
        skipped["llama_1b"] = "no CUDA device: the ~1B row runs only on GPU (code path: bench_model + gpu_overrides)"
    args.cache.mkdir(parents=True, exist_ok=True)
    load_start = load_now()
    results = {}
    for model in models:
        results[model] = bench_model(
            model, SETTINGS[model]["quick" if args.quick else "full"], args.cache, args.sft_steps
        )
    print_table([table_row(m, r) for m, r in results.items()])
    note = (
        "ReFT PPO step through RLRun on Ray: 1 actor + 1 critic + 1 reward worker, 1 torch thread each, fp32 "
        "on CPU; the logprobs/critic/reward phases overlap (inference = their wall time); medians over the "
        "measured steps after one warm-up step. The start checkpoint has only a few SFT steps, so sampled "
        "responses are near-random (mean length: response_length). The 2 cores are shared with other jobs "
        "(load_1m per step, load): wall times are stretched by that load; cpu_* (CPU seconds per role) much less."
    )
    path = write_result(
        args.out,
        {
            "benchmark": "ppo_step",
            "quick": args.quick,
            "config": "configs/reft-tiny-synthetic.yaml",
            "seconds_per_phase": {m: {k: r["median_s"][k] for k in PHASES} for m, r in results.items()},
            "cpu_seconds_per_step": {
                m: {k: v for k, v in r["median_s"].items() if k.startswith("cpu_") and k.count("_") == 1}
                for m, r in results.items()
            },
            "models": results,
            "skipped": skipped,
            "machine": machine_info(),
            "load": {"start": load_start, "end": load_now()},
            "note": note,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
