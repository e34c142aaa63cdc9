"""The trainer's side: a pool of sandboxes, each a supervisor that runs programs one by one.

Each slot owns one sandbox (``inside/supervisor.py`` started in the boundary that
:mod:`.isolation` chose) and talks to it in length-prefixed JSON frames over pipes. The slot
enforces its own deadline on top of the supervisor's: if a sandbox does not answer within
``timeout_s`` plus a grace period, or dies, the slot kills its whole process group and
reports TIMEOUT or KILLED for that program; the next program starts a fresh sandbox.
Sandboxes are started from the pool's own long-lived threads, because die-with-parent
(``PR_SET_PDEATHSIG``) fires when the *thread* that started a process exits.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import queue
import selectors
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from carft_nemo.rewards.sandbox import isolation
from carft_nemo.rewards.sandbox.config import SandboxConfig, SandboxResult, SandboxStatus
from carft_nemo.rewards.sandbox.inside.frames import read_frame, write_frame

GRACE_S = 5.0  # the supervisor's own sweep and scratch clean-up after a program's deadline


class SandboxStartError(RuntimeError):
    """A sandbox did not start (the message carries its stderr)."""


class _Slot:
    """One sandbox: started on first use and again after it died or was killed."""

    def __init__(self, config: SandboxConfig, mode: str) -> None:
        self.config, self.mode = config, mode
        self.proc: subprocess.Popen | None = None
        self.launch: isolation.Launch | None = None

    def start(self) -> None:
        self.launch = isolation.launch(self.config, self.mode)
        self.proc = subprocess.Popen(
            self.launch.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={},
            cwd="/",
            start_new_session=True,
            close_fds=True,
        )
        reply = self._reply(self.config.startup_timeout_s)
        if not isinstance(reply, dict) or not reply.get("ready"):
            err = self._stderr()
            self.stop()
            raise SandboxStartError(f"the {self.mode} sandbox did not start: {err or reply!r}")

    def _stderr(self) -> str:
        if self.proc is None or self.proc.poll() is None:
            return ""
        return self.proc.stderr.read().decode("utf-8", "replace").strip()[-2000:]

    def _reply(self, timeout: float) -> dict | None:
        """The next frame, or None at EOF or after ``timeout`` seconds."""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                return None
        try:
            return read_frame(self.proc.stdout.fileno())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the supervisor is its session's leader
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.kill()
            self.proc.wait()
            for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                pipe.close()
            self.proc = None
        if self.launch is not None and self.launch.host_scratch:
            shutil.rmtree(self.launch.host_scratch, ignore_errors=True)
        self.launch = None

    def run(self, source: str) -> SandboxResult:
        started = time.monotonic()
        if self.proc is None:
            self.start()
        try:
            write_frame(self.proc.stdin.fileno(), {"source": source})
        except OSError:
            reply = None
        else:
            reply = self._reply(self.config.timeout_s + GRACE_S)
        if not isinstance(reply, dict) or reply.get("status") not in SandboxStatus.__members__:
            alive = self.proc.poll() is None
            self.stop()
            if alive:
                return SandboxResult(SandboxStatus.TIMEOUT, error="the sandbox did not answer in time",
                                     duration_s=time.monotonic() - started)  # fmt: skip
            return SandboxResult(SandboxStatus.KILLED, error="the sandbox died", duration_s=time.monotonic() - started)
        status = SandboxStatus(reply["status"])
        return SandboxResult(
            status,
            reply.get("value") if status is SandboxStatus.OK else None,
            str(reply.get("error", "")),
            str(reply.get("stdout", "")),
            time.monotonic() - started,
        )


class SandboxPool:
    """``config.max_workers`` sandboxes; :meth:`run` returns results in input order."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.mode = isolation.choose(config)  # refuses here, before the first program
        self._slots: queue.Queue[_Slot] = queue.Queue()
        for _ in range(config.max_workers):
            self._slots.put(_Slot(config, self.mode))
        self._threads = ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="sandbox")
        self._closed = False

    def start(self) -> None:
        """Start every sandbox now (the reward server does, so a broken set-up fails at start-up)."""
        list(
            self._threads.map(lambda _: self._with_slot(lambda s: s.proc or s.start()), range(self.config.max_workers))
        )

    def _with_slot(self, fn):
        slot = self._slots.get()
        try:
            return fn(slot)
        finally:
            self._slots.put(slot)

    def run(self, sources: Sequence[str]) -> list[SandboxResult]:
        if self._closed:
            raise RuntimeError("the sandbox pool is closed")
        return list(self._threads.map(lambda src: self._with_slot(lambda s: s.run(src)), sources))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._threads.shutdown(wait=True)
        while not self._slots.empty():
            self._slots.get().stop()


_POOLS: dict[tuple, SandboxPool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(config: SandboxConfig) -> SandboxPool:
    """One pool per configuration per process, closed at exit."""
    key = dataclasses.astuple(config)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = SandboxPool(config)
        return _POOLS[key]


@atexit.register
def close_pools() -> None:
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            pool.close()
        _POOLS.clear()


def run_programs(sources: Sequence[str], config: SandboxConfig = SandboxConfig()) -> list[SandboxResult]:
    """Run many programs, ``config.max_workers`` at a time; results in input order."""
    return shared_pool(config).run(sources) if sources else []


def run_program(source: str, config: SandboxConfig = SandboxConfig()) -> SandboxResult:
    """Run one program and return what ``config.entry()`` returned, or why not."""
    return run_programs([source], config)[0]
