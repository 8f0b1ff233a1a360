"""Preemption: a signal (SIGTERM, or Slurm's --signal, e.g. SIGUSR1) or a wall-clock limit asks the
run to stop; all ranks agree at the next step boundary, save a checkpoint and exit with EXIT_PREEMPTED.

One policy for every launcher: only the main process of a rank decides. DataLoader workers ignore
the stop signals (`ignore_stop_signals`, their worker_init_fn), so a signal sent to the whole
process group (Slurm, torchrun, the DeepSpeed launcher) cannot kill them under a rank that is still
saving. A rank never outlives its launcher: `watch_launcher` turns the launcher's death into SIGTERM
for the rank (prctl PR_SET_PDEATHSIG, plus a watchdog for the DeepSpeed runner above launch.py),
which then checkpoints and exits like any other stop.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time

EXIT_PREEMPTED = 99  # documented in README: "checkpoint saved, resubmit/requeue to continue"
EXIT_NONFINITE = 98  # too many consecutive non-finite losses; latest stays on the last good checkpoint
# Written into the run folder by rank 0 once the preemption checkpoint is complete. Launchers that
# kill the remaining ranks when the first exits (srun --kill-on-bad-exit) may report another exit
# code; this file is the reliable signal to requeue.
PREEMPTED_MARKER = "PREEMPTED"
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stopped_message(step: int) -> str:
    return f"train.py: stopped at step {step}, checkpoint saved: run again to resume"


EXIT_ABORTED = 130  # a second Ctrl-C: the shell's code for death by SIGINT, no checkpoint
# A terminal's Ctrl-C reaches every process of the foreground group at once, and torchrun forwards
# the SIGINT it got to its ranks a moment later: both are one Ctrl-C. Only a SIGINT that comes this
# long after the first is a second Ctrl-C, the user's "abort now".
SECOND_INTERRUPT_AFTER_S = 2.0


class StopFlag:
    """Set by the stop signals (SIGINT included: Ctrl-C is a stop like any other, saved at the next
    step boundary instead of a KeyboardInterrupt that loses the steps since the last checkpoint) or
    by the time limit; read at step boundaries."""

    def __init__(self, signal_names: list[str], time_limit_minutes: float | None, run_dir=None):
        self.reason: str | None = None
        self.deadline = None
        self.run_dir = run_dir  # where a second Ctrl-C's verdict goes (EXIT_STATUS "130 aborted")
        self._first_interrupt: float | None = None
        self.arm(signal_names, time_limit_minutes)

    def arm(self, signal_names: list[str], time_limit_minutes: float | None) -> None:
        """Also stop on these signals and at this limit (from now). train.py arms SIGTERM and
        SIGINT before anything is imported or read, so that a stop during start-up (imports, the
        first DeepSpeed build) is held too; the Trainer adds the run's own preempt signal and limit."""
        if time_limit_minutes:
            self.deadline = time.monotonic() + 60 * time_limit_minutes
        for name in dict.fromkeys(signal_names):
            signal.signal(signal.Signals[name], self._handler)

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_interrupt is None:
                self._first_interrupt = now
                os.write(
                    2,
                    b"\nCtrl-C: saving a checkpoint at the next step boundary, then exit 99 "
                    b"(press Ctrl-C again to abort without saving)\n",
                )
            elif now - self._first_interrupt > SECOND_INTERRUPT_AFTER_S:
                self._abort()
        if self.reason is None:
            self.reason = f"signal {signal.Signals(signum).name}"

    def _abort(self) -> None:
        os.write(
            2,
            b"\nsecond Ctrl-C: aborting now, without a checkpoint (exit 130); "
            b"the run resumes from its last complete checkpoint\n",
        )
        from roberta_ds.training import exit_status  # light: no torch

        msg = "train.py: aborted by a second Ctrl-C, no checkpoint (the run resumes from its last)"
        exit_status.record(EXIT_ABORTED, msg, self.run_dir, kind="aborted")
        os._exit(EXIT_ABORTED)

    def requested(self) -> bool:
        if self.reason is None and self.deadline is not None and time.monotonic() >= self.deadline:
            self.reason = "time limit"
        return self.reason is not None


def ignore_stop_signals(extra: tuple[str, ...], worker_id: int = 0) -> None:
    """DataLoader worker_init_fn (bind `extra`, e.g. train.preempt_signal, with functools.partial):
    the workers leave stop decisions to their rank's main process."""
    for name in dict.fromkeys((*STOP_SIGNALS, *extra)):
        signal.signal(signal.Signals[name], signal.SIG_IGN)


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def watch_launcher(poll_s: float = 1.0) -> None:
    """Under a launcher (torchrun, the DeepSpeed launcher, srun, mpirun): SIGTERM this rank when
    its launcher dies. Plain `python train.py` is left alone (nohup keeps working)."""
    env = os.environ
    keys = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_STEP_ID", "OMPI_COMM_WORLD_SIZE")
    launched = any(k in env for k in keys)
    if not launched or not os.path.exists("/proc/self/stat"):
        return
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the watchdog still covers it
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    # The DeepSpeed runner starts launch.py, which starts the ranks: a SIGTERM to the runner alone
    # kills it and orphans launch.py, so watch the runner too (launch.py's parent).
    grandparent = _parent_of(parent) if "deepspeed.launcher.launch" in _cmdline(parent) else None

    def watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent or (grandparent and _parent_of(parent) != grandparent):
                os.kill(os.getpid(), signal.SIGTERM)
                return

    if os.getppid() != parent:  # died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()
