"""Subprocess plumbing for the RL fault-injection e2e tests (tests/e2e/test_rl_faults.py).

A run is a real ``recipes/rl.py`` driver started with ``Popen``; :class:`Run` keeps
watching the processes under it (the raylet, GCS and every ``ray::...`` worker are its
descendants) so that a test can pick *its own* critic to kill, and check afterwards that
none of them outlived the driver, without touching Ray runs of other users of the host.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from carft_nemo.telemetry.run_log import read_metrics

ROOT = Path(__file__).resolve().parents[2]
SFT_ARGS = [
    "train.steps=2",
    "train.eval_before=false",
    "train.eval_every=0",
    "train.eval_examples=8",
    "generation.max_new_tokens=16",
]
TINY_RL_ARGS = [
    "rl.save_every=1",
    "rl.eval_every=0",
    "rl.eval_examples=8",
    "rl.questions_per_step=8",
    "rl.mini_batch_size=8",
    "actor.micro_batch_size=8",
    "critic.micro_batch_size=8",
    "generation.max_new_tokens=48",
    "eval_generation.max_new_tokens=48",
]
RUN_TIMEOUT_S = 600.0  # one recipe run (SFT or RL) at test size
RESUMED = re.compile(r"resumed from \S+ \(step (\d+)\)")


def env() -> dict[str, str]:
    """Loopback-only, one thread per process, and never an outside Ray cluster."""
    out = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "PYTHONUNBUFFERED": "1",
        "RAY_AUTH_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }
    out.pop("RAY_ADDRESS", None)
    return out


def sft_command(out: Path) -> list[str]:
    config = ROOT / "configs" / "sft-tiny-synthetic.yaml"
    return [sys.executable, str(ROOT / "recipes" / "sft.py"), "--config", str(config), f"output_dir={out}", *SFT_ARGS]


def run_rl(sft: Path, out: Path, *overrides: str, config_name: str = "reft-tiny-synthetic.yaml"):
    """:func:`rl_command` run to its end (``subprocess.CompletedProcess`` with its output)."""
    return subprocess.run(rl_command(sft, out, *overrides, config_name=config_name), cwd=ROOT, env=env(),
                          timeout=RUN_TIMEOUT_S, capture_output=True, text=True)  # fmt: skip


def rl_command(sft: Path, out: Path, *overrides: str, config_name: str = "reft-tiny-synthetic.yaml") -> list[str]:
    """A tiny RL recipe (ReFT's by default) at test size; later ``overrides`` win over :data:`TINY_RL_ARGS`."""
    config = ROOT / "configs" / config_name
    return [
        sys.executable,
        str(ROOT / "recipes" / "rl.py"),
        "--config",
        str(config),
        f"sft_checkpoint={sft}",
        f"output_dir={out}",
        *TINY_RL_ARGS,
        *overrides,
    ]


def checkpoint_complete(out: Path, role: str, step: int) -> bool:
    return (out / "checkpoints" / role / f"step_{step}" / "COMPLETE").is_file()


def checkpoint_steps(out: Path, role: str) -> list[int]:
    """Steps with a complete checkpoint of ``role`` (the COMPLETE marker, as the resume code requires)."""
    root = out / "checkpoints" / role
    if not root.is_dir():
        return []
    return sorted(
        int(p.name[5:]) for p in root.iterdir() if re.fullmatch(r"step_\d+", p.name) and (p / "COMPLETE").is_file()
    )


def training_steps(records: list[dict]) -> list[int]:
    """Steps of the training records (eval records carry ``eval_accuracy`` and no ``actor_loss``)."""
    return [int(r["step"]) for r in records if "actor_loss" in r]


def metrics(out: Path) -> list[dict]:
    return read_metrics(out / "metrics.jsonl")


def resumed_step(stderr: str) -> int | None:
    found = RESUMED.findall(stderr)
    return int(found[-1]) if found else None


class Run:
    """One ``recipes/rl.py`` driver; stdout/stderr go to files under ``logs``."""

    def __init__(self, command: list[str], logs: Path) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = logs / "stdout.txt", logs / "stderr.txt"
        self._out = self.stdout_path.open("w")
        self._err = self.stderr_path.open("w")
        self.proc = subprocess.Popen(
            command, cwd=ROOT, env=env(), stdout=self._out, stderr=self._err, start_new_session=True
        )
        self.tree: dict[tuple[int, float], psutil.Process] = {}

    def watch(self) -> list[psutil.Process]:
        """Record every current descendant of the driver (kept across calls: they outlive it if leaked)."""
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        for child in children:
            try:
                self.tree.setdefault((child.pid, child.create_time()), child)
            except psutil.NoSuchProcess:
                continue
        return children

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Poll ``ready`` (and the process tree) until true; ``pytest.fail`` if the driver exits first.

        ``pytest.fail``, not ``assert``: a fixture's set-up failure must not count as the
        expected ``AssertionError`` of an ``xfail(raises=AssertionError)`` test using it.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.watch()
            if ready():
                return
            if self.proc.poll() is not None:
                pytest.fail(f"the run exited ({self.proc.returncode}) before {what}:\n{self.stderr()[-3000:]}")
            time.sleep(0.2)
        pytest.fail(f"no {what} within {timeout_s:.0f} s:\n{self.stderr()[-3000:]}")

    def workers(self, name: str) -> list[psutil.Process]:
        """This run's live processes whose name or command line contains ``name`` (e.g. ``CriticWorker``)."""
        found = []
        for child in self.watch():
            try:
                if name in child.name() or name in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.NoSuchProcess:
                continue
        return found

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            self._out.flush()
            self._err.flush()

    def survivors(self, grace_s: float) -> list[str]:
        """Processes seen under the driver still alive ``grace_s`` after the driver is gone."""
        _, alive = psutil.wait_procs(list(self.tree.values()), timeout=grace_s)
        described = []
        for p in alive:
            try:
                described.append(f"{p.pid} {p.name()}")
            except psutil.NoSuchProcess:
                continue
        return described

    def stderr(self) -> str:
        if not self._err.closed:  # still running, or not cleaned up yet
            self._err.flush()
        return self.stderr_path.read_text(errors="replace")

    def cleanup(self) -> None:
        """Kill whatever of this run is still alive (after a failed assertion): the driver and its tree."""
        self.watch()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        for p in self.tree.values():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self._out.close()
        self._err.close()
