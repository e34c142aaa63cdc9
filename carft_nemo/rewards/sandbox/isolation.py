"""Which operating-system boundary the sandbox uses here, and the command that starts one sandbox.

``auto`` takes bubblewrap when it works and the trainer is not root (bubblewrap maps the
sandbox's root to the caller's uid: for a root trainer that would be root outside), else the
kernel's namespaces entered by our own code (``inside/namespaces.py``, which maps root inside
to uid 65534 for a root trainer), else refuses to start, naming what is missing and how to
enable it. The weak ``process`` mode (no boundary) runs only when chosen, with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from carft_nemo.rewards.sandbox.config import SandboxConfig

INSIDE = Path(__file__).with_name("inside")
MOUNTED_AT = "/opt/carft-sandbox"  # where the supervisor's folder appears inside the sandbox
NOBODY = 65534
SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
_PROBE = (
    "import ctypes, os\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.unshare(0x10000000 | 0x00020000 | 0x20000000 | 0x40000000) != 0:\n"
    "    raise SystemExit(os.strerror(ctypes.get_errno()))\n"
)
_HOW_TO_ENABLE = (
    "Enable one: install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; RHEL/Rocky: dnf install "
    "bubblewrap) and run the trainer as a non-root user, or allow user namespaces "
    "(sysctl user.max_user_namespaces=15000; Debian kernels: kernel.unprivileged_userns_clone=1; Ubuntu 24.04: "
    "kernel.apparmor_restrict_unprivileged_userns=0). Or accept the weaker sandbox without an "
    "operating-system boundary (model-written programs can then read the trainer's files and environment) "
    "with sandbox.isolation: process (reward.sandbox.isolation in RL configs)."
)
_warned_weak = False


class IsolationUnavailable(RuntimeError):
    """No operating-system boundary is available for the configured isolation."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """How to start one sandbox: the command, and the scratch folder on the host (weak mode only)."""

    command: list[str]
    host_scratch: str | None = None


def interpreter() -> str:
    """The real interpreter (not a venv's link): the supervisor needs only its standard library."""
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def _read_only_binds() -> tuple[list[list[str]], list[list[str]]]:
    """Host paths the interpreter needs (bound read-only at the same path) and system symlinks."""
    binds, links = [], []
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            links.append([d, os.readlink(d)])
        elif os.path.isdir(d):
            binds.append([d, d])
    prefix = os.path.realpath(sys.base_prefix)
    if not any(prefix == src or prefix.startswith(src + "/") for src, _ in binds):
        binds.append([prefix, prefix])
    exe = interpreter()
    if not any(exe.startswith(src + "/") for src, _ in binds):
        binds.append([exe, exe])
    binds.append([str(INSIDE), MOUNTED_AT])
    return binds, links


def _bwrap_problem(config: SandboxConfig) -> str | None:
    if not config.bwrap:
        return "not used (sandbox.bwrap is empty)"
    if shutil.which(config.bwrap) is None:
        return f"{config.bwrap!r} not found"
    if os.geteuid() == 0:
        return "the trainer runs as root, and bubblewrap would map the sandbox's root to root outside"
    return _run_probe([shutil.which(config.bwrap), "--unshare-all", "--ro-bind", "/", "/", "true"], "bubblewrap")


def _namespaces_problem(config: SandboxConfig) -> str | None:
    if not config.user_namespaces:
        return "treated as unavailable (sandbox.user_namespaces: false)"
    return _run_probe([interpreter(), "-I", "-S", "-c", _PROBE], "unshare(user, mount, pid, net)")


def _run_probe(command: list[str], what: str) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, env={})
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{what} failed: {err}"
    if done.returncode != 0:
        return f"{what} failed: {(done.stderr or done.stdout).strip()[-300:] or f'exit code {done.returncode}'}"
    return None


def choose(config: SandboxConfig) -> str:
    """The isolation mode to use; raises :class:`IsolationUnavailable` with what to do."""
    global _warned_weak
    if config.isolation == "process":
        if not _warned_weak:
            _warned_weak = True
            warnings.warn(
                "the P-CoT sandbox runs without an operating-system boundary (sandbox.isolation: process): "
                "programs are confined only by rlimits and an in-process policy they can switch off",
                RuntimeWarning,
                stacklevel=2,
            )
        return "process"
    problems = {}
    for mode, probe in (("bwrap", _bwrap_problem), ("namespaces", _namespaces_problem)):
        if config.isolation not in ("auto", mode):
            continue
        problem = probe(config)
        if problem is None:
            return mode
        problems[mode] = problem
    names = {"bwrap": "bubblewrap", "namespaces": "kernel namespaces"}
    found = "; ".join(f"{names[m]}: {p}" for m, p in problems.items())
    raise IsolationUnavailable(
        f"sandbox.isolation: {config.isolation}: the P-CoT sandbox needs an operating-system boundary and "
        f"none is available here ({found}). {_HOW_TO_ENABLE}"
    )


def launch(config: SandboxConfig, mode: str) -> Launch:
    """The command that starts one sandbox's supervisor in ``mode``."""
    spec = {"mode": mode, "limits": config.limits(), "scratch": "/tmp"}
    supervisor = [interpreter(), "-I", "-S", "-B"]
    if mode == "process":
        spec["scratch"] = tempfile.mkdtemp(prefix="carft-sbx-")
        return Launch([*supervisor, str(INSIDE / "supervisor.py"), json.dumps(spec)], spec["scratch"])
    binds, links = _read_only_binds()
    if mode == "namespaces":
        root = os.geteuid() == 0
        spec.update(
            binds=binds,
            symlinks=links,
            scratch_mb=config.scratch_mb,
            outside_uid=NOBODY if root else os.geteuid(),
            outside_gid=NOBODY if root else os.getegid(),
        )
        return Launch([*supervisor, str(INSIDE / "supervisor.py"), json.dumps(spec)])
    command = [shutil.which(config.bwrap) or config.bwrap, "--unshare-all", "--die-with-parent", "--as-pid-1"]
    command += ["--new-session", "--clearenv", "--hostname", "sandbox"]
    for src, dst in binds:
        command += ["--ro-bind", src, dst]
    for link, target in links:
        command += ["--symlink", target, link]
    for device in ("null", "zero", "urandom", "random"):
        command += ["--dev-bind", f"/dev/{device}", f"/dev/{device}"]
    command += ["--proc", "/proc", "--size", str(config.scratch_mb << 20), "--tmpfs", "/tmp"]
    command += ["--remount-ro", "/", "--chdir", "/tmp"]
    return Launch([*command, *supervisor, f"{MOUNTED_AT}/supervisor.py", json.dumps(spec)])
