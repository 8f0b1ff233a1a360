"""SIGTERM checkpoints and exits 99 with DataLoader workers under every launcher, ranks never
outlive their launcher, and a finished run run again rewrites nothing."""

import contextlib
import os
import signal
import subprocess
import time

import pytest

from tests.training.conftest import ROOT, launch, launch_cmd, losses, write_config, write_ds
from tests.training.launching import Launch, ranks_alive

pytestmark = pytest.mark.multiproc


# What each launcher returns when its ranks stop on a signal and exit 99, as measured here (the
# table in docs/reliability.md); EXIT_STATUS says "99 preempted" under all of them.
PREEMPTED_RC = {
    "python": 99,
    "torchrun": 1,
    "deepspeed": -15,
}  # -15: the runner dies of the SIGTERM (shell: 143)


def _check_stopped(run: Launch, code: int, launcher: str) -> int:
    """The stop's checkpoint, markers and exit status; returns the step it stopped at."""
    run_dir, out = run.run_dir, run.out[-3000:]
    assert code == PREEMPTED_RC[launcher], out
    assert (run_dir / "PREEMPTED").is_file(), out
    assert (run_dir / "EXIT_STATUS").read_text().split("\n")[0] == "99 preempted", out
    stopped = max(losses(run_dir))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}", out
    deadline = time.time() + 60
    while time.time() < deadline and ranks_alive(run_dir):
        time.sleep(0.5)
    assert not ranks_alive(run_dir), "ranks outlived the stop"
    return stopped


@pytest.mark.parametrize("launcher", ["python", "torchrun", "deepspeed"])
def test_sigterm_with_dataloader_workers_checkpoints_and_exits_99(launcher, kjv_dataset, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", kjv_dataset, run_dir, max_steps=2000, save_every=0)
    cfg.write_text(cfg.read_text().replace("num_workers: 0", "num_workers: 1"))
    nproc = 1 if launcher == "python" else 2
    run = Launch(launch_cmd(launcher, nproc, cfg, write_ds(tmp_path / "ds.json")), run_dir)
    try:
        run.wait_for_step(3)
        # the launcher alone, as a scheduler or a user's kill would: for the DeepSpeed launcher this
        # is its runner, which dies and leaves launch.py and the ranks behind unless they watch it
        run.proc.send_signal(signal.SIGTERM)
        code = run.wait(timeout=120)
    finally:
        run.kill()
    assert _check_stopped(run, code, launcher) < 2000


@pytest.mark.parametrize("workers", [0, 1])
def test_sigterm_to_every_process_with_wandb_under_the_deepspeed_launcher_resumes_exactly(
    workers, kjv_dataset, tmp_path
):
    """`kill -TERM` to every process of the job (runner, launch.py, ranks, DataLoader workers,
    W&B's service), as Slurm's scancel and a container stop do; then (with a worker: one resume
    check is enough for CI's time) resuming replays the uninterrupted run's per-step losses."""
    cfg_args = dict(max_steps=2000, save_every=0)
    ds = write_ds(tmp_path / "ds.json")
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", kjv_dataset, run_dir, **cfg_args)
    cfg.write_text(cfg.read_text().replace("num_workers: 0", f"num_workers: {workers}"))
    wandb = {"WANDB_MODE": "offline"}
    run = Launch(launch_cmd("deepspeed", 2, cfg, ds), run_dir, wandb)
    try:
        run.wait_for_step(3)
        for pid in [run.proc.pid, *run.descendants()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        code = run.wait(timeout=120)
    finally:
        run.kill()
    stopped = _check_stopped(run, code, "deepspeed")
    if workers == 0:
        return
    # the rest, twice: resumed from the stop, and from scratch (the same max_steps: the same schedule)
    runs = {}
    for name, extra in (("resumed", ("--resume", "auto")), ("straight", ())):
        d = run_dir if name == "resumed" else tmp_path / "straight"
        c = write_config(tmp_path / f"{name}.yaml", kjv_dataset, d, **cfg_args)
        c.write_text(c.read_text().replace("num_workers: 0", "num_workers: 1"))
        r = Launch(launch_cmd("torchrun", 2, c, ds, *extra), d, wandb)
        try:
            r.wait_for_step(stopped + 2)
        finally:
            r.kill()
        runs[name] = losses(d)
    for step in range(1, stopped + 3):
        assert runs["resumed"][step] == runs["straight"][step], (step, runs)


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


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_ctrl_c_to_the_process_group_checkpoints_and_exits_99(launcher, kjv_dataset, tmp_path):
    """A terminal's Ctrl-C: SIGINT to every process of the foreground group (launcher, ranks,
    DataLoader workers), W&B offline on as the Quickstart has it. torchrun forwards its own SIGINT
    to the ranks a moment later, which must not count as a second Ctrl-C."""
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", kjv_dataset, run_dir, max_steps=2000, save_every=0)
    cfg.write_text(cfg.read_text().replace("num_workers: 0", "num_workers: 1"))
    nproc = 1 if launcher == "python" else 2
    run = Launch(
        launch_cmd(launcher, nproc, cfg, write_ds(tmp_path / "ds.json")), run_dir, {"WANDB_MODE": "offline"}
    )
    try:
        run.wait_for_step(3)
        os.killpg(run.proc.pid, signal.SIGINT)  # the terminal's foreground group
        code = run.wait(timeout=90)  # no hang in multiprocessing's exit handler
    finally:
        run.kill()
    assert "KeyboardInterrupt" not in run.out, run.out[-3000:]
    _check_stopped(run, code, launcher)


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
