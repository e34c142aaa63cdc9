"""Run model-written P-CoT programs (``def solution(): ... return result``) behind an operating-system boundary.

Threat model
------------
In an RL run the policy writes these programs and is rewarded by what they return, so a
program that can change its own verdict is a reward-hacking channel as well as a security
hole. The boundary is the kernel's, not Python's:

* **Namespaces** (bubblewrap, or our own ``inside/namespaces.py``): new user (root inside is
  an unprivileged uid outside: the caller's, or 65534 for a root trainer), PID, network (no
  interface but a down loopback), mount, IPC and UTS namespaces. The file system is a
  read-only view of what the interpreter needs (``/usr``, the interpreter's prefix, the
  supervisor's folder) plus a private, size-limited tmpfs ``/tmp`` as scratch; the host's
  other files, home, ``/tmp``, other processes' ``/proc`` and the trainer's environment are not
  there. Every sandbox dies with the process that started it (``PR_SET_PDEATHSIG``), and with
  its PID namespace's init every process in it.
* **A supervisor inside** (``inside/supervisor.py``) pre-starts the interpreter and forks one
  process per program. That process gets rlimits (CPU, address space, file size, open
  files, processes, no core), no capabilities, no_new_privs and a seccomp filter that kills
  it on calls a pure program never needs (ptrace, mount, unshare, bpf, kexec, modules,
  keyrings, exec, sockets, ...). After each program the supervisor, the PID namespace's init,
  kills every other process in the namespace and empties the scratch tmpfs.
* **The verdict** (:class:`SandboxStatus`) is decided by the supervisor and the trainer from
  what they observed (deadline, signals, output size, exit status); the program's own
  process can only hand in an answer or a failure. A program that prints a fake report line
  prints output, nothing more.
* **Inner layer** (``inside/policy.py``, ``inner_policy``): an import allow-list and an audit hook
  that turn common mistakes (``import os``, ``open('/etc/passwd')``) into clear FORBIDDEN
  messages. A program can switch it off; nothing depends on it.

Not covered: kernel bugs (the filter narrows the reachable system calls, it does not remove
them), side channels, CPU time of other programs on the same cores. Without bubblewrap or
user namespaces the sandbox refuses to start (:class:`IsolationUnavailable` says how to enable
one) unless ``isolation: process`` is chosen, which keeps rlimits, a supervised process group
and the inner layer only, and warns once per run. Linux only.
"""

from carft_nemo.rewards.sandbox.config import SandboxConfig, SandboxResult, SandboxStatus
from carft_nemo.rewards.sandbox.isolation import IsolationUnavailable
from carft_nemo.rewards.sandbox.pool import SandboxPool, SandboxStartError, run_program, run_programs, shared_pool

__all__ = [
    "IsolationUnavailable",
    "SandboxConfig",
    "SandboxPool",
    "SandboxResult",
    "SandboxStartError",
    "SandboxStatus",
    "run_program",
    "run_programs",
    "shared_pool",
]
