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
