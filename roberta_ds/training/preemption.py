"""Preemption: a signal (SIGTERM, or Slurm's --signal, e.g. SIGUSR1) or a wall-clock limit asks the
run to stop; all ranks agree at the next step boundary, save a checkpoint and exit with EXIT_PREEMPTED."""

from __future__ import annotations

import signal
import time

EXIT_PREEMPTED = 99  # documented in README: "checkpoint saved, resubmit/requeue to continue"
EXIT_NONFINITE = 98
# Written into the run folder by rank 0 once the preemption checkpoint is complete. Launchers that
# kill the remaining ranks when the first exits (srun --kill-on-bad-exit) may report another exit
# code; this file is the reliable signal to requeue.
PREEMPTED_MARKER = "PREEMPTED"  # too many consecutive non-finite losses; a checkpoint was saved


class StopFlag:
    def __init__(self, signal_names: list[str], time_limit_minutes: float | None):
        self.reason: str | None = None
        self.deadline = time.monotonic() + 60 * time_limit_minutes if time_limit_minutes else None
        for name in dict.fromkeys(signal_names):
            sig = getattr(signal, name, None)
            if not isinstance(sig, signal.Signals):
                raise ValueError(f"train.preempt_signal: unknown signal {name!r}")
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.reason = f"signal {signal.Signals(signum).name}"

    def requested(self) -> bool:
        if self.reason is None and self.deadline is not None and time.monotonic() >= self.deadline:
            self.reason = "time limit"
        return self.reason is not None
