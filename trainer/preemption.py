"""Stopping a training job cleanly when the cluster asks: SLURM sends SIGTERM (or the SIGUSR1 of
`#SBATCH --signal=USR1@T`) some time before it kills a preempted or timed-out job.

A signal only sets a flag. Once per optimizer step the ranks combine their flags (`StopRequest.agreed`, an
all-reduce of one number), so every rank sees the same answer at the same step, even when the signal reached
only some of them or reached them during different steps; they then save one checkpoint together and leave
with `pcd.pipeline.errors.Preempted`, which the CLI turns into exit status `RESUMABLE_EXIT_CODE`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from types import FrameType
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from pcd.pipeline.errors import RESUMABLE_EXIT_CODE, Preempted

__all__ = ["PREEMPTION_SIGNALS", "RESUMABLE_EXIT_CODE", "Preempted", "StopRequest"]

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Context manager that catches SIGTERM/SIGUSR1 while training and says, collectively, when to stop.

    Signal handlers can only be installed from the main thread; elsewhere (a notebook's worker thread) the
    process keeps the default behaviour of the signals and `agreed` only reflects the other ranks.
    """

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self._previous: dict[int, Any] = {}
        self._group: Any = None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in PREEMPTION_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        if dist.is_initialized() and dist.get_world_size() > 1 and dist.get_backend() != "gloo":
            # The flag travels over a CPU (gloo) group: an NCCL all-reduce would need a GPU sync every step.
            self._group = dist.new_group(backend="gloo")
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.signal = signum

    def agreed(self, distributed: bool) -> bool:
        """True on every rank when any rank has been signalled (collective: every rank calls it each step)."""
        local = self.signal is not None
        if not distributed:
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item() and self.signal is None:
            self.signal = -1  # another rank's signal
        return bool(flag.item())

    @contextlib.contextmanager
    def shielding_children(self) -> Iterator[None]:
        """Block the signals in this thread while it starts processes (DataLoader workers, which an epoch's
        `iter(loader)` and an evaluation start): children inherit the blocked mask. SLURM signals every process of
        a job, and torchrun its ranks' process groups; a loader worker that took the SIGTERM would die (torch's
        worker handler re-raises it), and its rank with it, before the ranks could save. Shielded, the workers
        keep serving until their rank ends them; a signal to this process meanwhile waits until the block ends."""
        if not self._previous or not hasattr(signal, "pthread_sigmask"):
            yield
            return
        before = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)

    def describe(self) -> str:
        """The signal's name for the log ('SIGTERM'), or that another rank received it."""
        if self.signal is None or self.signal < 0:
            return "a signal on another rank"
        return signal.Signals(self.signal).name
