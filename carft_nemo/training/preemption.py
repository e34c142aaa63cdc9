"""Clean stop on SIGTERM / SIGUSR1 (Slurm preemption and time limits).

The handler only records the signal; the training loop asks :meth:`should_stop` at step
boundaries, saves a checkpoint and returns normally (exit 0; ``slurm/run.sbatch`` then
requeues the job, which resumes from that checkpoint). The flag is
OR-reduced across all ranks so every rank stops at the same step (a rank that saved alone
would leave an incomplete checkpoint and a hung collective).
"""

from __future__ import annotations

import signal
import types

import torch
import torch.distributed as dist

from carft_nemo.distributed import device

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._record)

    def _record(self, signum: int, _frame: types.FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def should_stop(self) -> bool:
        """True on every rank as soon as any rank got a stop signal (collective call)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device.local_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
