"""SIGTERM checkpoints and exits 99 with DataLoader workers under every launcher, ranks never
outlive their launcher, and a finished run run again rewrites nothing."""

import os
import signal
import subprocess
import time

import pytest

from tests.training.conftest import ROOT, env, launch, launch_cmd, losses, write_config, write_ds

pytestmark = pytest.mark.multiproc


def _ranks_alive(run_dir) -> list[str]:
    out = subprocess.run(
        ["pgrep", "-f", f"--config {run_dir.parent}/run.yaml"], capture_output=True, text=True
    )
    return [p for p in out.stdout.split() if int(p) != os.getpid()]


@pytest.mark.parametrize("launcher", ["python", "torchrun", "deepspeed"])
def test_sigterm_with_dataloader_workers_checkpoints_and_exits_99(launcher, kjv_dataset, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", kjv_dataset, run_dir, max_steps=2000, save_every=0)
    cfg.write_text(cfg.read_text().replace("num_workers: 0", "num_workers: 1"))
    nproc = 1 if launcher == "python" else 2
    cmd = launch_cmd(launcher, nproc, cfg, write_ds(tmp_path / "ds.json"))
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (
            (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= 3
        ):
            time.sleep(0.2)
        # the launcher alone, as a scheduler or a user's kill would: for the DeepSpeed launcher this
        # is its runner, which dies and leaves launch.py and the ranks behind unless they watch it
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        deadline = time.time() + 90
        while time.time() < deadline and _ranks_alive(run_dir):
            time.sleep(0.5)
        assert not _ranks_alive(run_dir), "ranks outlived their launcher"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if launcher == "python":
        assert proc.returncode == 99, out[-3000:]
    assert (run_dir / "PREEMPTED").is_file(), out[-3000:]
    stopped = max(losses(run_dir))
    assert stopped < 2000
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}", out[-3000:]


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
    cmd = launch_cmd(launcher, nproc, cfg, write_ds(tmp_path / "ds.json"))
    e = dict(env(), WANDB_MODE="offline")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (
            (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= 3
        ):
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=90)  # no hang in multiprocessing's exit handler
        deadline = time.time() + 30
        while time.time() < deadline and _ranks_alive(run_dir):
            time.sleep(0.5)
        assert not _ranks_alive(run_dir), "ranks outlived the Ctrl-C"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "KeyboardInterrupt" not in out, out[-3000:]
    if launcher == "python":
        assert proc.returncode == 99, out[-3000:]
    assert (run_dir / "PREEMPTED").is_file(), out[-3000:]
    stopped = max(losses(run_dir))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}", out[-3000:]


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
