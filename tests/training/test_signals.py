"""Every stop (Ctrl-C, a second Ctrl-C, SIGTERM to the launcher or to every process) under every
launcher ends in a checkpoint (or, for the abort, none), a clear exit status and no process left,
and resuming replays the uninterrupted run; a finished run run again rewrites nothing."""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from roberta_ds.training.preemption import SECOND_INTERRUPT_AFTER_S
from tests.training.conftest import (
    ROOT,
    launch,
    launch_cmd,
    launcher_env,
    losses,
    write_config,
    write_ds,
)
from tests.training.launching import STRAIGHT_STEPS, Launch, ranks_alive, stop_config

pytestmark = pytest.mark.multiproc


# What each launcher returns, as measured here (the table in docs/reliability.md), when its ranks
# stop on a signal and exit 99 (EXIT_STATUS says "99 preempted" under all of them), per stop.
PREEMPTED_RC = {
    ("python", "ctrl-c"): {99},
    ("python", "sigterm-to-the-launcher"): {99},
    ("python", "sigterm-to-every-process"): {99},
    ("torchrun", "ctrl-c"): {1},
    ("torchrun", "sigterm-to-the-launcher"): {1},
    ("torchrun", "sigterm-to-every-process"): {1},
    # the runner dies of the SIGTERM (a shell sees 143) and its ranks follow it out
    # the runner dies of the SIGINT (a shell: 130), or now and then (1 of 3 full CI runs on 2 cores)
    # exits 1, the code of its launch.py, whose own SIGINT handler exits 1: DeepSpeed's code, not
    # ours; the stop itself (checkpoint, PREEMPTED, EXIT_STATUS) is asserted as for every launcher
    ("deepspeed", "ctrl-c"): {-2, 1},
    ("deepspeed", "sigterm-to-the-launcher"): {-15},
    ("deepspeed", "sigterm-to-every-process"): {-15},
    ("mpirun", "ctrl-c"): {1},
    ("mpirun", "sigterm-to-the-launcher"): {1},
    ("mpirun", "sigterm-to-every-process"): {1},
}
# ... and after a second Ctrl-C: (code, within seconds, EXIT_STATUS's first line). torchrun does not
# forward a second SIGINT: it dies of it, and first kills its ranks with SIGKILL at the end of its
# --shutdown_timeout (30 s by default), so they leave no verdict ("- running" reads as failed).
ABORTED = {
    "python": ({130}, 10, "130 aborted"),
    "torchrun": ({1}, 45, "- running"),
    "deepspeed": ({-2, 1}, 10, "130 aborted"),  # -2, or 1 as after the first Ctrl-C
}
WANDB_OFFLINE = {"WANDB_MODE": "offline"}  # on, as the Quickstart has it: a logger must not decide


def stop(run: Launch, how: str) -> None:
    """A stop as people and clusters send it."""
    if how in ("ctrl-c", "second-ctrl-c"):  # a terminal's Ctrl-C: SIGINT to the foreground group
        os.killpg(run.proc.pid, signal.SIGINT)
    elif how == "sigterm-to-the-launcher":  # a user's or a scheduler's kill of the launcher alone
        run.proc.send_signal(signal.SIGTERM)
    elif how == "sigterm-to-every-process":  # scancel, a container stop: launcher, ranks, workers, W&B
        for pid in [run.proc.pid, *run.descendants()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    else:
        raise ValueError(how)


def _check_stopped(run: Launch, code: int, launcher: str, how: str) -> int:
    """The stop's checkpoint, markers and exit status; returns the step it stopped at."""
    run_dir, out = run.run_dir, f"[{launcher}, {how}] " + run.out[-3000:]
    assert code in PREEMPTED_RC[launcher, how], (code, out)
    assert (run_dir / "PREEMPTED").is_file(), out
    assert (run_dir / "EXIT_STATUS").read_text().split("\n")[0] == "99 preempted", out
    # no rank's traceback (KeyboardInterrupt, a logger's ConnectionResetError); torchrun prints its own
    assert not re.search(r'File ".*(train\.py|roberta_ds/)', run.out), out
    stopped = max(losses(run_dir))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}", out
    _check_nothing_left(run)
    return stopped


def _check_nothing_left(run: Launch) -> None:
    deadline = time.time() + 60
    while time.time() < deadline and ranks_alive(run.run_dir):
        time.sleep(0.5)
    assert not ranks_alive(run.run_dir), "ranks outlived the stop"


CHAINS = [
    ("python", 0),
    ("python", 1),
    ("torchrun", 0),
    ("torchrun", 1),
    ("deepspeed", 1),
    pytest.param(
        "mpirun",
        1,
        marks=pytest.mark.skipif(
            shutil.which("mpirun") is None, reason="Open MPI not installed (scripts/setup.sh installs it)"
        ),
    ),
]


def _hang_the_data(run: Launch) -> None:
    """Stop every DataLoader worker (SIGSTOP) and wait until the ranks have eaten what was
    prefetched and hang in their next batch: a stop cannot reach a step boundary now, as when a
    filesystem or a node stops answering."""
    ranks = run.train_processes()
    workers = [p for p in run.descendants() if _parent(p) in ranks and _cmdline(p) == _cmdline(_parent(p))]
    assert workers, "no DataLoader worker to stop"
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    seen, quiet_since = max(losses(run.run_dir)), time.time()
    while time.time() - quiet_since < 3:
        time.sleep(0.2)
        if max(losses(run.run_dir)) != seen:
            seen, quiet_since = max(losses(run.run_dir)), time.time()
    run.hung_workers = workers


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return 0


@pytest.mark.parametrize("launcher, workers", CHAINS)
def test_every_stop_in_turn_checkpoints_exits_clearly_and_resuming_replays_the_straight_run(
    launcher, workers, straight, kjv_dataset, tmp_path
):
    """One run stopped every way in turn, each session resumed (`--resume auto`) from the one
    before: Ctrl-C, SIGTERM to every process, (with DataLoader workers) a Ctrl-C that cannot be
    honoured because the data hangs and a second Ctrl-C that aborts, SIGTERM to the launcher. W&B
    offline and TensorBoard on. Each stop: its checkpoint (none for the abort), PREEMPTED,
    EXIT_STATUS, the launcher's code, no process left. Then every step's loss equals the
    uninterrupted run's."""
    nproc = 1 if launcher == "python" else 2
    run_dir = tmp_path / "run"
    cfg = stop_config(tmp_path / "run.yaml", kjv_dataset, run_dir, workers)
    ds = write_ds(tmp_path / "ds.json")
    stops = ["ctrl-c", "sigterm-to-every-process", "second-ctrl-c", "sigterm-to-the-launcher"]
    # The hang is made by stopping the workers; mpirun has no second Ctrl-C for the ranks (it turns
    # the first into SIGCONT and SIGTERM to each rank's process group, then SIGKILL 1 s later).
    if workers == 0 or launcher == "mpirun":
        stops.remove("second-ctrl-c")
    last = 0
    for how in stops:
        (run_dir / "EXIT_STATUS").unlink(missing_ok=True)  # as the Slurm scripts do before a launch
        (run_dir / "PREEMPTED").unlink(missing_ok=True)
        cmd = launch_cmd(launcher, nproc, cfg, ds, "--resume", "auto")
        run = Launch(cmd, run_dir, WANDB_OFFLINE, base_env=launcher_env(launcher))
        try:
            run.wait_for_step(last + 2)
            if how == "second-ctrl-c":
                _hang_the_data(run)
                stop(run, how)
                time.sleep(SECOND_INTERRUPT_AFTER_S + 0.5)
                stop(run, how)
                t0 = time.time()
                code = run.proc.wait(timeout=60)
                aborted_in = time.time() - t0
                for pid in run.hung_workers:  # the hung filesystem answers again
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
                run.wait(timeout=30)
            else:
                stop(run, how)
                code = run.wait(timeout=120)
        finally:
            run.kill()
        if how == "second-ctrl-c":
            out = run.out[-3000:]
            want_code, within_s, status = ABORTED[launcher]
            assert code in want_code, out
            assert aborted_in < within_s, (aborted_in, out)
            assert (run_dir / "EXIT_STATUS").read_text().split("\n")[0] == status, out
            if status == "130 aborted":
                assert "second Ctrl-C: aborting now, without a checkpoint" in run.out, out
            assert not (run_dir / "PREEMPTED").exists(), out
            assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{last:08d}", out
            _check_nothing_left(run)
        else:
            last = _check_stopped(run, code, launcher, how)
    want = straight(nproc)
    assert last < STRAIGHT_STEPS
    got = losses(run_dir)
    assert sorted(got) == list(range(1, last + 1))
    assert got == {s: want[s] for s in got}


def test_rerunning_a_finished_run_rewrites_nothing(kjv_dataset, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", kjv_dataset, run_dir, max_steps=4, save_every=2)
    ds = write_ds(tmp_path / "ds.json")
    assert launch("python", 1, cfg, ds).returncode == 0

    def snap():
        files = sorted(p for p in run_dir.rglob("*") if p.is_file() and p.name != "metrics.jsonl")
        return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in files if "checkpoints" in p.parts}

    before, metrics = snap(), (run_dir / "metrics.jsonl").read_text()
    res = launch("python", 1, cfg, ds)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "the run is complete at step 4" in res.stderr
    assert snap() == before and (run_dir / "metrics.jsonl").read_text() == metrics
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]


def test_a_second_ctrl_c_aborts_at_once_and_one_ctrl_c_seen_twice_does_not():
    """StopFlag alone, in a child process: two SIGINTs within SECOND_INTERRUPT_AFTER_S are one
    Ctrl-C (the flag is set, the process goes on); a later one exits 130 without saving."""
    code = (
        "import os, signal, time\n"
        "from roberta_ds.training.preemption import StopFlag, SECOND_INTERRUPT_AFTER_S\n"
        "f = StopFlag(['SIGTERM', 'SIGINT'], None)\n"
        "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGINT)\n"
        "assert f.requested() and f.reason == 'signal SIGINT'\n"
        "print('still running', flush=True)\n"
        "time.sleep(SECOND_INTERRUPT_AFTER_S + 0.5)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(30)\n"
        "print('not aborted', flush=True)\n"
    )
    import sys

    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 130, r.stdout + r.stderr
    assert "still running" in r.stdout and "not aborted" not in r.stdout
    assert "second Ctrl-C: aborting now" in r.stderr
