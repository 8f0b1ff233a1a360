"""Stall watchdog: a rank that makes no progress for train.stall_timeout_s stops every rank.

A rank stopped with SIGSTOP, a node that stops answering without closing its sockets, or a
collective that never completes leaves the other ranks blocked inside gloo/NCCL with no message.
Each rank runs two daemon threads on its own client of the job's TCPStore (the one the process
group formed on: MASTER_ADDR:MASTER_PORT), so they work while the main thread is blocked in a
collective:

- heartbeat: every `interval` s sets `roberta_hb/<rank>` = "<beat> <step> <host> <pid>";
- monitor: reads the others'. A rank whose value has not changed for the timeout (by this rank's
  own clock: no cross-host clock skew) is stalled; so is the world when this rank's own step has
  not advanced for the timeout while every heartbeat goes on (a collective that never completes:
  the ranks furthest behind are named).

Then each live rank prints one message naming the rank, its step and host, writes EXIT_STATUS
`99 stalled` and exits 99 at once (os._exit: the main thread is stuck in a collective). Slurm's
scripts requeue on it and the run resumes from `latest`. No checkpoint is saved at a stall: a save
is a collective that needs the stalled rank, so the latest complete checkpoint is the one resumed.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import threading
import time

from roberta_ds.training import exit_status
from roberta_ds.training.preemption import EXIT_PREEMPTED

KEY = "roberta_hb/{}"


class Watchdog:
    def __init__(self, rank: int, world: int, timeout_s: float, run_dir, interval_s: float | None = None):
        self.rank, self.world, self.timeout_s, self.run_dir = rank, world, timeout_s, run_dir
        self.interval_s = interval_s or min(5.0, timeout_s / 4)
        self.step = 0  # this rank's step: set on resume, then by stepped()
        self._training = False  # a step completed in this session
        self._done = threading.Event()
        self._host = socket.gethostname()

    def start(self) -> None:
        if self.timeout_s <= 0 or self.world < 2:
            return
        for target in (self._beat, self._monitor):
            threading.Thread(target=target, name=f"watchdog-{target.__name__}", daemon=True).start()

    def stepped(self, step: int) -> None:
        """Called by the training loop after each optimizer step."""
        self.step, self._training = step, True

    def finish(self) -> None:
        """This rank is leaving on purpose: the others must not read its silence as a stall."""
        if self._done.is_set() or self.timeout_s <= 0 or self.world < 2:
            return
        self._done.set()
        # the store's host may be gone already: then the others are leaving too
        with contextlib.suppress(Exception):
            self._store().set(KEY.format(self.rank), "done")

    def _store(self):
        import torch.distributed as dist

        return dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=max(5.0, self.interval_s * 2)),
        )

    def _beat(self) -> None:
        store, beat = None, 0
        while not self._done.is_set():
            beat += 1
            try:
                store = store or self._store()
                store.set(KEY.format(self.rank), f"{beat} {self.step} {self._host} {os.getpid()}")
            except Exception:  # the store's host is stalled or gone: the monitor names it
                store = None
            self._done.wait(self.interval_s)

    def _monitor(self) -> None:
        store, seen, mine = None, {}, (self.step, time.monotonic())
        store_lost = time.monotonic()
        while not self._done.wait(self.interval_s):
            now = time.monotonic()
            if self.step != mine[0]:
                mine = (self.step, now)
            try:
                store = store or self._store()
                others = [r for r in range(self.world) if r != self.rank]
                # a rank that never beat (stalled before its first heartbeat) is "0 ? ? ?", not a
                # blocking read of a missing key that would look like a lost store
                there = [r for r in others if store.check([KEY.format(r)])]
                values = {r: "0 ? ? ?" for r in others}
                values.update(
                    zip(there, (v.decode() for v in store.multi_get([KEY.format(r) for r in there])))
                )
                store_lost = now
            except Exception:
                store = None
                if now - store_lost > self.timeout_s:  # the host of the store (rank 0 or the launcher)
                    self._stop(
                        f"the job's store at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
                        f"(rank 0's host) has not answered for {now - store_lost:.0f} s"
                    )
                continue
            for r, v in values.items():
                if seen.get(r, (None,))[0] != v:
                    seen[r] = (v, now)
            live = {r: v.split() for r, (v, _) in seen.items() if v != "done"}
            for r, (v, since) in sorted(seen.items()):
                if v != "done" and now - since > self.timeout_s:
                    _, step, host, pid = live[r]
                    self._stop(
                        f"rank {r} (host {host}, pid {pid}) has sent no heartbeat for {now - since:.0f} s, "
                        f"last at step {step} (heartbeats are {self.interval_s:g} s apart)"
                    )
            steps = {r: int(f[1]) for r, f in live.items() if f[1] != "?"}
            # Counted from this session's first step on: before it, slow phases are legitimate
            # (rank 0 preparing the built-in corpus, loading a checkpoint) and heartbeats cover them.
            if steps and self._training and now - mine[1] > self.timeout_s:
                behind = min(steps.values())
                if behind >= self.step:  # every rank waits in the same collective
                    who = f"every rank, in a collective after step {self.step}"
                else:
                    who = ", ".join(
                        f"rank {r} (host {f[2]}) at step {f[1]}"
                        for r, f in sorted(live.items())
                        if steps.get(r) == behind
                    )
                self._stop(f"no step has completed for {now - mine[1]:.0f} s: waiting on {who}")

    def _stop(self, what: str) -> None:
        msg = (
            f"train.py: stall (train.stall_timeout_s={self.timeout_s:g}): {what}. Rank {self.rank} "
            f"(host {self._host}) stops at step {self.step}. No checkpoint can be saved at a stall (a "
            "save needs every rank); the latest complete one is intact: run again to resume"
        )
        print(f"{msg} (exit {EXIT_PREEMPTED})", file=sys.stderr, flush=True)
        exit_status.record(EXIT_PREEMPTED, msg, self.run_dir, kind="stalled")
        os._exit(EXIT_PREEMPTED)
