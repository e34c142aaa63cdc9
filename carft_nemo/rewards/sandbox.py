"""Run model-written P-CoT programs (``def solution(): ... return result``) in isolation.

Each program runs in its own short-lived child process (``_sandbox_worker.py``); many run
in parallel from a thread pool, each thread owning one child. The result is the
``solution()`` return value as a float, or a typed :class:`SandboxStatus` failure.

Threat model (honest version)
-----------------------------
What this is for: ReFT/PPO rollouts produce thousands of programs written by a small model.
They are careless rather than malicious: infinite loops, huge prints, runaway memory,
exceptions, the odd ``import os``. The sandbox keeps those from hanging or crashing the
trainer, from filling the disk, from touching the network or files outside a scratch
folder, and from leaving processes behind.

Layers, outermost first:

* Process: a fresh interpreter per program, ``python -I -S -B`` (no env vars honoured, no
  site-packages, no cwd on ``sys.path``), an **empty environment** (no secrets to read),
  cwd = a fresh scratch folder removed afterwards, its own session/process group.
* Time: a wall-clock deadline enforced by the parent, plus ``RLIMIT_CPU``. On deadline,
  and **after every program**, the whole process group is killed with ``SIGKILL``
  (``killpg`` while the leader is still unreaped, so the group id cannot have been
  recycled), so children that outlive the program die too.
* Resources: ``RLIMIT_AS`` (memory), ``RLIMIT_FSIZE`` (file size), ``RLIMIT_NOFILE``,
  ``RLIMIT_CORE=0``, ``RLIMIT_NPROC=0`` (no effect when running as root); program output is
  kept in a bounded buffer inside the child and the parent stops reading (and kills) past
  a byte cap on the pipes.
* Network: best-effort ``unshare(CLONE_NEWUSER|CLONE_NEWNET)`` in the child (works when
  unprivileged user namespaces are enabled, or as root); independent of that, every
  ``socket.*`` audit event is refused.
* Policy inside the interpreter: ``__import__`` limited to a list of pure modules (math,
  fractions, datetime, ...) and a ``sys.addaudithook`` hook refusing process creation
  (``os.fork``, ``subprocess.Popen``, ``os.system``, ``os.exec*``, ``os.posix_spawn``),
  signals (``os.kill``), ``ctypes``, filesystem mutation, tracing hooks, new imports, and
  any ``open``/listing of a path outside the scratch folder (reads included, so
  ``/etc/passwd`` and ``/proc/<ppid>/environ`` are refused). A refusal is recorded, so a
  program that catches the exception is still reported ``FORBIDDEN``.

What it is **not**: a security boundary against a determined attacker. Audit hooks are
in-process Python; code that reaches memory corruption in the interpreter, or a kernel
bug, escapes them, and without the network namespace only the hook stands between a
program and the network. Do not run untrusted code from the internet with this; use a
container / gVisor / nsjail for that. Resource limits also rely on Linux semantics
(``RLIMIT_AS`` and ``RLIMIT_NPROC`` behave differently elsewhere); Linux only.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from carft_nemo.config.base import require

WORKER = Path(__file__).with_name("_sandbox_worker.py")


class SandboxStatus(str, enum.Enum):
    """Outcome of one program. Everything but ``OK`` is a failure."""

    OK = "OK"  # solution() returned a finite real number
    TIMEOUT = "TIMEOUT"  # wall-clock deadline or RLIMIT_CPU reached
    EXCEPTION = "EXCEPTION"  # the program raised (incl. RecursionError, SystemExit)
    SYNTAX_ERROR = "SYNTAX_ERROR"  # the program does not compile
    KILLED = "KILLED"  # the child died from a signal we did not send for time
    NO_RESULT = "NO_RESULT"  # no solution() / returned None / child gave no report
    NOT_A_NUMBER = "NOT_A_NUMBER"  # returned something that is not a finite real number
    OUTPUT_TOO_LARGE = "OUTPUT_TOO_LARGE"  # printed more than the output limit
    MEMORY = "MEMORY"  # MemoryError under RLIMIT_AS
    FORBIDDEN = "FORBIDDEN"  # touched network / processes / files / imports the policy refuses


@dataclasses.dataclass
class SandboxConfig:
    """Limits for one program run.

    Attributes:
        timeout_s: wall-clock deadline per program (parent-enforced), seconds, counted from
            the end of interpreter start-up.
        startup_timeout_s: wall-clock bound on start-up itself (slow under heavy load).
        cpu_time_s: ``RLIMIT_CPU`` soft limit, whole seconds (hard = soft + 1).
        memory_mb: ``RLIMIT_AS`` address-space limit, MiB (the interpreter itself needs ~30).
        max_output_chars: program stdout+stderr kept; more is ``OUTPUT_TOO_LARGE``.
        max_file_bytes: ``RLIMIT_FSIZE``: largest file the program may write in scratch.
        max_workers: programs run in parallel by :func:`run_programs`.
        entry: name of the function to call.
        unshare_network: try to enter an empty network namespace.
        enforce_policy: audit hook + import allow-list. Only tests of the lower layers
            turn this off.
        scratch_root: where per-program scratch folders are created (``None``: system temp).
    """

    timeout_s: float = 5.0
    startup_timeout_s: float = 30.0
    cpu_time_s: int = 5
    memory_mb: int = 512
    max_output_chars: int = 64 * 1024
    max_file_bytes: int = 1024 * 1024
    max_workers: int = 2
    entry: str = "solution"
    unshare_network: bool = True
    enforce_policy: bool = True
    scratch_root: str | None = None

    def __post_init__(self) -> None:
        require(self.timeout_s > 0, "timeout_s", "must be > 0")
        require(self.startup_timeout_s > 0, "startup_timeout_s", "must be > 0")
        require(self.cpu_time_s >= 1, "cpu_time_s", "must be >= 1 (whole seconds)")
        require(self.memory_mb >= 64, "memory_mb", "must be >= 64 (the interpreter needs ~30)")
        require(self.max_output_chars >= 0, "max_output_chars", "must be >= 0")
        require(self.max_file_bytes >= 0, "max_file_bytes", "must be >= 0")
        require(self.max_workers >= 1, "max_workers", "must be >= 1")
        require(self.entry.isidentifier(), "entry", f"not an identifier: {self.entry!r}")


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """What one program did: ``value`` is set iff ``status`` is ``OK``."""

    status: SandboxStatus
    value: float | None = None
    error: str = ""
    stdout: str = ""
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status is SandboxStatus.OK


def _read_bounded(
    proc: subprocess.Popen, deadline: float, cap: int, run_timeout: float
) -> tuple[bytes, bytes, str | None, float]:
    """Read the child's stdout/stderr until EOF, the deadline, or ``cap`` bytes in total.

    ``deadline`` first bounds start-up; at the child's first output (its ready marker) it
    becomes ``now + run_timeout``, so interpreter start-up on a loaded machine does not
    eat the program's time. Returns (stdout, stderr, reason, deadline) with reason
    ``None`` (EOF), ``"timeout"`` or ``"overflow"``. Never blocks past the deadline.
    """
    started = False
    chunks: dict[int, list[bytes]] = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}
    total = 0
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return b"".join(chunks[proc.stdout.fileno()]), b"", "timeout", deadline
            for key, _ in sel.select(remaining):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                if not started:
                    started, deadline = True, time.monotonic() + run_timeout
                chunks[key.fd].append(data)
                total += len(data)
                if total > cap:
                    return b"", b"", "overflow", deadline
    return b"".join(chunks[proc.stdout.fileno()]), b"".join(chunks[proc.stderr.fileno()]), None, deadline


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Wait for ``pid`` to exit *without reaping it* (so its pid/pgid stays reserved)."""
    delay = 0.0005
    while True:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None and info.si_pid == pid:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.01)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # group already empty


def _limits_json(config: SandboxConfig) -> str:
    return json.dumps(
        {
            "cpu_time_s": config.cpu_time_s,
            "memory_mb": config.memory_mb,
            "max_output_chars": config.max_output_chars,
            "max_file_bytes": config.max_file_bytes,
            "entry": config.entry,
            "unshare_network": config.unshare_network,
            "enforce_policy": config.enforce_policy,
        }
    )


def _interpret(returncode: int, stdout: bytes, reason: str | None) -> tuple[SandboxStatus, float | None, str, str]:
    if reason == "timeout":
        return SandboxStatus.TIMEOUT, None, "wall-clock deadline", ""
    if reason == "overflow":
        return SandboxStatus.OUTPUT_TOO_LARGE, None, "output over the pipe cap", ""
    if returncode in (-signal.SIGXCPU,):
        return SandboxStatus.TIMEOUT, None, "RLIMIT_CPU", ""
    lines = stdout.decode("utf-8", "replace").strip().splitlines()
    report = None
    if lines:
        try:
            report = json.loads(lines[-1])
        except json.JSONDecodeError:
            report = None
    if not isinstance(report, dict) or report.get("status") not in SandboxStatus.__members__:
        if returncode < 0:
            return SandboxStatus.KILLED, None, f"signal {-returncode}", ""
        return SandboxStatus.NO_RESULT, None, f"no report (exit code {returncode})", ""
    status = SandboxStatus(report["status"])
    value = report.get("value") if status is SandboxStatus.OK else None
    error = str(report.get("error", report.get("repr", "")))
    return status, value, error, str(report.get("stdout", ""))


def run_program(source: str, config: SandboxConfig = SandboxConfig()) -> SandboxResult:
    """Run ``source`` in a fresh sandboxed child and return ``config.entry()``'s value.

    Blocks at most about ``config.timeout_s`` plus start-up (itself bounded by
    ``config.startup_timeout_s``); the child's whole
    process group is dead and its scratch folder removed when this returns.
    """
    start = time.monotonic()
    scratch = tempfile.mkdtemp(prefix="carft-sbx-", dir=config.scratch_root)
    proc: subprocess.Popen | None = None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", str(WORKER), _limits_json(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=scratch,
            env={},
            start_new_session=True,
            close_fds=True,
        )
        deadline = start + config.startup_timeout_s
        try:
            proc.stdin.write(source.encode("utf-8", "replace"))
            proc.stdin.close()
        except BrokenPipeError:
            pass  # the child died early; its exit status says why
        # The pipe cap allows for JSON escaping of the (already bounded) captured output.
        stdout, _, reason, deadline = _read_bounded(
            proc, deadline, 4 * config.max_output_chars + 65536, config.timeout_s
        )
        if reason is None and not _wait_unreaped(proc.pid, deadline):
            reason = "timeout"
        _kill_group(proc.pid)  # always: children that outlived the program die here
        returncode = proc.wait()
        status, value, error, out = _interpret(returncode, stdout, reason)
        return SandboxResult(status, value, error, out, time.monotonic() - start)
    finally:
        if proc is not None and proc.returncode is None:
            _kill_group(proc.pid)
            proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr) if proc is not None else ():
            if pipe is not None:
                pipe.close()
        shutil.rmtree(scratch, ignore_errors=True)


def run_programs(sources: Sequence[str], config: SandboxConfig = SandboxConfig()) -> list[SandboxResult]:
    """Run many programs, ``config.max_workers`` at a time; results in input order."""
    if not sources:
        return []
    with ThreadPoolExecutor(max_workers=min(config.max_workers, len(sources))) as pool:
        return list(pool.map(lambda src: run_program(src, config), sources))
