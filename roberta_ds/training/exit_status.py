"""How a run ended, readable whatever the launcher returns.

Launchers do not pass a rank's exit code through: torchrun exits 1 for any failed rank (99 and 2
alike) and prints ~40 lines of ChildFailedError after the rank's own message; srun and mpirun
report their own codes (docs/reliability.md has the measured table). So every rank also writes
`<run_dir>/EXIT_STATUS`, one line `<code> <kind>` and the message (then spaces: the file holds
its 4 KB from the start, so a verdict can be written on a full disk; `- running` until then):

    0 done | 2 bad-input | 3 rendezvous | 98 nonfinite | 99 preempted | 99 stalled (training/watchdog.py)
    | 130 aborted (a second Ctrl-C) | 1 failed (a crash)

A process killed outright (SIGKILL, OOM) writes nothing, so a script removes the file before it
launches and reads "no file" as failed. Under torchrun the message also goes into the rank's
TORCHELASTIC_ERROR_FILE, which torchrun prints as the last lines of its report ("traceback :").
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import time
from pathlib import Path

EXIT_STATUS_FILE = "EXIT_STATUS"
KINDS = {0: "done", 2: "bad-input", 3: "rendezvous", 98: "nonfinite", 99: "preempted", 130: "aborted"}


def run_dir_of(config_path: str | None, override: str | None) -> str | None:
    """The run folder a config names, read without validating it: a config that fails its checks
    still says where its verdict goes (train.run_dir, else TrainConfig's default)."""
    if override is not None:
        return override
    import yaml

    from roberta_ds.config import TrainConfig

    try:
        raw = yaml.safe_load(Path(config_path).read_text()) if config_path else {}
        return str(((raw or {}).get("train") or {}).get("run_dir") or TrainConfig.run_dir)
    except (OSError, yaml.YAMLError, AttributeError):  # unreadable: the message says so; no folder
        return None


def kind_of(code: int) -> str:
    return KINDS.get(code, "failed")


RESERVED = 4096  # bytes kept for the verdict, so that it can be written on a full disk


def reserve(run_dir: str | Path | None) -> None:
    """At start: hold EXIT_STATUS's space ("- running", padded), unless a file is there (another
    rank's verdict may already be in it; scripts remove the file before they launch)."""
    if run_dir is None:
        return
    with contextlib.suppress(OSError):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(Path(run_dir) / EXIT_STATUS_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(b"- running\n".ljust(RESERVED, b" "))


def record(code: int, message: str, run_dir: str | Path | None, kind: str | None = None) -> int:
    """Write the verdict into EXIT_STATUS (in place, in its reserved bytes: no new space needed)
    and, under torchrun, the error file; returns code. Best effort: never a traceback of its own."""
    if run_dir is not None:
        data = f"{code} {kind or kind_of(code)}\n{message}\n".encode()
        with contextlib.suppress(OSError):
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            with open(
                Path(run_dir) / EXIT_STATUS_FILE,
                "r+b" if (Path(run_dir) / EXIT_STATUS_FILE).exists() else "wb",
            ) as f:
                f.write(data.ljust(max(RESERVED, len(data)), b" "))  # one write, as long as before
                f.truncate()
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if code != 0 and message and error_file:
        with contextlib.suppress(OSError):
            Path(error_file).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))
    return code


def explain(e: BaseException, run_dir: str | Path | None, since: float) -> tuple[int, str] | None:
    """A failure that is a verdict, not a bug: (code, message), or None.

    - a full disk anywhere (metrics, loggers, a checkpoint): exit 2, named;
    - a collective that broke because another rank left with a verdict (written after `since`,
      this process's start): that verdict, so every rank tells the same story."""
    chain, x = [], e
    while x is not None and len(chain) < 10:
        chain.append(x)
        x = x.__cause__ or x.__context__
    if any(getattr(c, "errno", None) == errno.ENOSPC for c in chain):
        return 2, f"train.py: error: no space left on device: {e}"
    if run_dir is not None:
        status = Path(run_dir) / EXIT_STATUS_FILE
        try:
            if status.stat().st_mtime >= since:
                first, message = status.read_text().rstrip().split("\n", 2)[:2]
                code = int(first.split()[0])
                if code != 1:
                    return code, f"{message} (from another rank; here: {type(e).__name__})"
        except (OSError, ValueError, IndexError):
            pass
    return None


def exit_now(code: int) -> None:
    """Leave without interpreter finalisation (train.py, and the benchmarks that run DeepSpeed under
    torchrun), after distributed.shutdown(). DeepSpeed keeps its process groups referenced in
    module globals, so gloo's worker threads outlive destroy_process_group() and can release tensors
    while Python finalises, aborting a finished run (seen under mpirun, exit 134). The caller has
    written and closed everything (checkpoints, metrics.jsonl, DeepSpeed's monitors flush per write)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()  # mpirun treats a rank that exits without MPI_Finalize as failed
    os._exit(code)
