"""What the sandbox is asked to do (:class:`SandboxConfig`) and what it reports (:class:`SandboxResult`)."""

from __future__ import annotations

import dataclasses
import enum

from carft_nemo.config.base import require

ISOLATIONS = ("auto", "bwrap", "namespaces", "process")


class SandboxStatus(str, enum.Enum):
    """Outcome of one program. Everything but ``OK`` is a failure.

    Who decides each one (module docstring of :mod:`carft_nemo.rewards.sandbox`): the kernel
    or the supervising process for TIMEOUT, KILLED, OUTPUT_TOO_LARGE, FORBIDDEN (a system
    call the seccomp filter kills) and NO_RESULT; the program's own process for the rest,
    which a program can only use to fail.
    """

    OK = "OK"  # solution() returned a finite real number
    TIMEOUT = "TIMEOUT"  # wall-clock deadline or RLIMIT_CPU reached
    EXCEPTION = "EXCEPTION"  # the program raised (incl. RecursionError, SystemExit, OSError from a refused call)
    SYNTAX_ERROR = "SYNTAX_ERROR"  # the program does not compile
    KILLED = "KILLED"  # the program died from a signal nobody sent for time or policy, or its sandbox died
    NO_RESULT = "NO_RESULT"  # no solution() / returned None / exited without a result
    NOT_A_NUMBER = "NOT_A_NUMBER"  # returned something that is not a finite real number
    OUTPUT_TOO_LARGE = "OUTPUT_TOO_LARGE"  # wrote more than the output limit to stdout/stderr
    MEMORY = "MEMORY"  # MemoryError under RLIMIT_AS
    FORBIDDEN = "FORBIDDEN"  # a system call the seccomp filter refuses, or the inner policy layer refused


# What the program's own process may report: failures, and OK with its answer. Anything else
# it writes is not a verdict (the supervisor decides TIMEOUT, KILLED, OUTPUT_TOO_LARGE).
SELF_REPORTED = frozenset(
    {
        SandboxStatus.OK,
        SandboxStatus.EXCEPTION,
        SandboxStatus.SYNTAX_ERROR,
        SandboxStatus.NO_RESULT,
        SandboxStatus.NOT_A_NUMBER,
        SandboxStatus.MEMORY,
        SandboxStatus.FORBIDDEN,
    }
)


@dataclasses.dataclass
class SandboxConfig:
    """Isolation and limits of the P-CoT sandbox (``reward.sandbox`` in RL configs).

    Attributes:
        isolation: ``auto`` (bubblewrap when the trainer is not root and ``bwrap`` works,
            else the kernel's namespaces set up by our own code), ``bwrap``, ``namespaces``,
            or ``process``: no operating-system boundary (a supervised child process and the
            in-process policy only), which must be chosen explicitly and logs a warning once.
        bwrap: the bubblewrap executable; ``""`` means do not use bubblewrap.
        user_namespaces: ``false`` treats the kernel's user namespaces as unavailable (as on
            clusters that disable them), for testing the start-up refusal.
        timeout_s: wall-clock deadline per program, from fork to result, seconds.
        cpu_time_s: ``RLIMIT_CPU`` soft limit, whole seconds (hard = soft + 1).
        memory_mb: ``RLIMIT_AS`` of a program's process, MiB.
        max_processes: ``RLIMIT_NPROC`` of a program's process (counted per uid: a program
            never needs to fork, this only bounds a fork bomb until the sweep kills it).
        max_output_chars: bytes a program may write to stdout+stderr; more is OUTPUT_TOO_LARGE.
        max_file_bytes: ``RLIMIT_FSIZE``: the largest file a program may write in scratch.
        scratch_mb: size of the sandbox's private scratch tmpfs (its whole disk).
        max_workers: sandboxes running programs in parallel (one pre-started interpreter each).
        entry: name of the function to call.
        inner_policy: the in-process layer (import allow-list + audit hook) that turns common
            mistakes into clear FORBIDDEN messages; nothing depends on it.
        seccomp: the system-call filter (x86_64 and aarch64; elsewhere skipped with a warning).
        startup_timeout_s: bound on starting one sandbox (slow on a loaded machine).
    """

    isolation: str = "auto"
    bwrap: str = "bwrap"
    user_namespaces: bool = True
    timeout_s: float = 5.0
    cpu_time_s: int = 5
    memory_mb: int = 512
    max_processes: int = 32
    max_output_chars: int = 64 * 1024
    max_file_bytes: int = 1024 * 1024
    scratch_mb: int = 16
    max_workers: int = 2
    entry: str = "solution"
    inner_policy: bool = True
    seccomp: bool = True
    startup_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        require(self.isolation in ISOLATIONS, "isolation", f"must be one of {ISOLATIONS}, got {self.isolation!r}")
        require(self.timeout_s > 0, "timeout_s", "must be > 0")
        require(self.startup_timeout_s > 0, "startup_timeout_s", "must be > 0")
        require(self.cpu_time_s >= 1, "cpu_time_s", "must be >= 1 (whole seconds)")
        require(self.memory_mb >= 64, "memory_mb", "must be >= 64 (the interpreter needs ~30)")
        require(self.max_processes >= 1, "max_processes", "must be >= 1")
        require(self.max_output_chars >= 0, "max_output_chars", "must be >= 0")
        require(self.max_file_bytes >= 0, "max_file_bytes", "must be >= 0")
        require(self.scratch_mb >= 1, "scratch_mb", "must be >= 1")
        require(self.max_workers >= 1, "max_workers", "must be >= 1")
        require(self.entry.isidentifier(), "entry", f"not an identifier: {self.entry!r}")

    def limits(self) -> dict:
        """What the supervisor inside the sandbox enforces per program (JSON-able)."""
        return {
            "timeout_s": self.timeout_s,
            "cpu_time_s": self.cpu_time_s,
            "memory_mb": self.memory_mb,
            "max_processes": self.max_processes,
            "max_output_chars": self.max_output_chars,
            "max_file_bytes": self.max_file_bytes,
            "entry": self.entry,
            "inner_policy": self.inner_policy,
            "seccomp": self.seccomp,
        }


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
