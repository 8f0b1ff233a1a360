"""slurm/pretrain.sbatch against a real Slurm (2 simulated nodes x 2 tasks, CPU/gloo)."""

import json
import re
import sys
import time

import pytest

from tests.training.conftest import ROOT, losses, write_config, write_ds

pytestmark = pytest.mark.multiproc
ALLOC = ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1", "--time=15"]


def submit(cluster, tmp_path, cfg, ds, *extra_args, env=None, script="slurm/pretrain.sbatch"):
    log = tmp_path / "job-%j.out"
    jid = cluster.sbatch(
        [
            *ALLOC,
            f"--output={log}",
            script,
            "--config",
            str(cfg),
            "--deepspeed_config",
            str(ds),
            "--run_dir",
            str(tmp_path / "run"),
            *extra_args,
        ],
        cwd=ROOT,
        env={"OMP_NUM_THREADS": "1", **(env or {})},
    )
    return jid, tmp_path / f"job-{jid}.out"


def test_sbatch_two_nodes_trains_with_world_size_four(cluster, kjv_dataset, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", kjv_dataset, tmp_path / "run", max_steps=12, save_every=6)
    ds = write_ds(tmp_path / "ds.json", train_batch_size=16, train_micro_batch_size_per_gpu=4)
    jid, log = submit(cluster, tmp_path, cfg, ds)
    info = cluster.wait_job(jid)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert "world 4" in text and "master 127.0.0.1:" in text
    assert "global batch 16 = micro 4 x accumulation 1 x 4 ranks" in text
    assert sorted(losses(tmp_path / "run")) == list(range(1, 13))
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000012"
    assert (
        len(list((tmp_path / "run" / "checkpoints" / "step_00000012").glob("zero_pp_rank_*_model_states.pt")))
        == 4
    )


@pytest.fixture(scope="module")
def straight4(cluster, kjv_dataset, tmp_path_factory):
    """Per-step losses of an uninterrupted 4-rank job with the stopped jobs' schedule (max_steps
    60), to step 30: what a stopped, requeued and resumed job must replay."""
    tmp = tmp_path_factory.mktemp("straight4")
    cfg = write_config(tmp / "run.yaml", kjv_dataset, tmp / "run", max_steps=60, save_every=0)
    ds = write_ds(tmp / "ds.json", train_batch_size=16, train_micro_batch_size_per_gpu=4)
    jid, log = submit(cluster, tmp, cfg, ds, env={"WANDB_MODE": "disabled"})
    deadline = time.time() + 300
    while time.time() < deadline and not (
        (tmp / "run" / "metrics.jsonl").exists() and max(losses(tmp / "run"), default=0) >= 30
    ):
        time.sleep(0.5)
    cluster.run(["scancel", str(jid)], check=False)
    cluster.wait_job(jid, timeout=120, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    got = losses(tmp / "run")
    assert max(got) >= 30, log.read_text()[-3000:]
    return {s: got[s] for s in range(1, 31)}


@pytest.mark.parametrize(
    "signal, num_workers",
    [
        ("USR1", 0),  # what #SBATCH --signal=USR1@180 sends before the time limit
        ("TERM", 1),  # what scancel and most preemption policies send; DataLoader workers must not die first
    ],
)
def test_preemption_signal_checkpoints_requeues_and_resumes(
    cluster, kjv_dataset, tmp_path, signal, num_workers, straight4
):
    """The signal to every task of the job's steps, W&B offline on as the Quickstart has it: a
    checkpoint, a requeue, a resume that replays the uninterrupted job's losses."""
    cfg = write_config(tmp_path / "run.yaml", kjv_dataset, tmp_path / "run", max_steps=60, save_every=0)
    cfg.write_text(cfg.read_text().replace("num_workers: 0", f"num_workers: {num_workers}"))
    ds = write_ds(tmp_path / "ds.json", train_batch_size=16, train_micro_batch_size_per_gpu=4)
    jid, log = submit(cluster, tmp_path, cfg, ds, env={"WANDB_MODE": "offline"})
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and max(losses(metrics.parent), default=0) >= 5):
        time.sleep(0.5)
    cluster.run(["scancel", f"--signal={signal}", str(jid)])  # to every task of the job's steps
    info = cluster.wait_job(jid, timeout=400, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert int(info["Restarts"]) == 1
    assert "requeueing job" in text and "restart 1" in text
    stopped = int(text.split("stopping at step ")[1].split(":")[0])
    assert f"resumed from {tmp_path}/run/checkpoints/step_{stopped:08d} at step {stopped}" in text
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert rows[-1]["step"] == 60 and stopped < 30
    assert {r["step"]: r["loss"] for r in rows if r["step"] <= 30} == straight4


def test_wrong_node_count_fails_with_a_message(cluster, kjv_dataset, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", kjv_dataset, tmp_path / "run")
    ds = write_ds(tmp_path / "ds.json", train_batch_size=16, train_micro_batch_size_per_gpu=4)
    jid, log = submit(cluster, tmp_path, cfg, ds, env={"EXPECTED_NODES": "3"})
    info = cluster.wait_job(jid, timeout=60)
    assert info["JobState"] == "FAILED"
    assert "expects EXPECTED_NODES=3 nodes but Slurm allocated 2" in log.read_text()


def test_missing_config_fails_with_a_message(cluster, tmp_path):
    jid, log = submit(cluster, tmp_path, tmp_path / "nope.yaml", "ds_configs/cpu_zero3.json")
    info = cluster.wait_job(jid, timeout=60)
    assert info["JobState"] == "FAILED"
    assert f"config not found: {tmp_path}/nope.yaml" in log.read_text()


def test_batch_size_that_does_not_fit_the_world_fails_before_training(cluster, kjv_dataset, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", kjv_dataset, tmp_path / "run")
    ds = write_ds(
        tmp_path / "ds.json", train_batch_size=8, train_micro_batch_size_per_gpu=4
    )  # needs 16 at world 4
    jid, log = submit(cluster, tmp_path, cfg, ds)
    info = cluster.wait_job(jid, timeout=120)
    assert info["JobState"] == "FAILED"
    assert (
        "train_batch_size=8 is not divisible by train_micro_batch_size_per_gpu=4 x world size 4"
        in log.read_text()
    )


def test_deepspeed_launcher_variant_with_generated_hostfile(cluster, kjv_dataset, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", kjv_dataset, tmp_path / "run", max_steps=6, save_every=3)
    ds = write_ds(tmp_path / "ds.json", train_batch_size=16, train_micro_batch_size_per_gpu=4)
    jid, log = submit(cluster, tmp_path, cfg, ds, script="slurm/pretrain_deepspeed.sbatch")
    info = cluster.wait_job(jid)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert "127.0.0.1 slots=2" in text and "127.0.0.2 slots=2" in text  # hostfile from SLURM_JOB_NODELIST
    assert "global batch 16 = micro 4 x accumulation 1 x 4 ranks" in text
    assert sorted(losses(tmp_path / "run")) == list(range(1, 7))


@pytest.mark.parametrize(
    "status, rc, requeued, code",
    [
        ("99 preempted", 1, True, 0),  # torchrun's 1 for a rank's 99
        ("99 stalled", 1, True, 0),
        ("2 bad-input", 1, False, 2),
        ("98 nonfinite", 1, False, 98),
        ("130 aborted", 1, False, 130),
        ("0 done", 0, False, 0),
        (None, 137, False, 137),  # killed outright: no verdict written
    ],
)
def test_the_scripts_act_on_exit_status_not_on_the_launchers_code(status, rc, requeued, code, tmp_path):
    """common.sh's finish(), alone (no Slurm): requeue on preempted/stalled, never on bad input."""
    import subprocess

    run = tmp_path / "run"
    run.mkdir()
    if status:
        (run / "EXIT_STATUS").write_text(f"{status}\ntrain.py: error: the message\n")
    (tmp_path / "scontrol").write_text('#!/bin/sh\necho "scontrol $*"\n')
    (tmp_path / "scontrol").chmod(0o755)
    script = (
        f"export PATH={tmp_path}:$PATH RUN_DIR={run} SLURM_JOB_ID=7\n"
        'die() { echo "error: $*" >&2; exit 1; }\n'
        f"eval \"$(sed -n '/^finish()/,/^}}/p' {ROOT}/slurm/common.sh)\"\n"
        f"finish {rc}\n"
    )
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert r.returncode == code, r.stdout + r.stderr
    assert ("scontrol requeue 7" in r.stdout) == requeued, r.stdout + r.stderr
    if status == "2 bad-input":
        assert "bad input, not requeued: train.py: error: the message" in r.stderr


def test_an_interactive_srun_is_killed_by_ctrl_c_and_sigterm_and_stopped_by_scancel(
    cluster, kjv_dataset, tmp_path, straight4
):
    """`srun ... python train.py` in a terminal. Ctrl-C twice within a second (srun's rule: one
    only prints the tasks' states) and SIGTERM to srun are both srun's "forcing job termination":
    SIGKILL to every task at once, so nothing can be saved and the latest periodic checkpoint
    stays. `scancel --signal=TERM <job>` reaches the tasks themselves: a checkpoint, PREEMPTED,
    and the run replays the uninterrupted job's losses."""
    import os
    import signal
    import subprocess

    from tests.training.conftest import env, free_port

    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", kjv_dataset, run_dir, max_steps=60, save_every=2)
    cfg.write_text(cfg.read_text().replace("num_workers: 0", "num_workers: 1"))
    ds = write_ds(tmp_path / "ds.json", train_batch_size=16, train_micro_batch_size_per_gpu=4)

    def latest() -> int:
        return int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])

    def srun(step: int) -> subprocess.Popen:
        e = {k: v for k, v in env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        e.update(cluster.env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WANDB_MODE="offline")
        cmd = [
            "srun",
            *ALLOC,
            sys.executable,
            "train.py",
            "--config",
            str(cfg),
            "--deepspeed_config",
            str(ds),
        ]
        started = time.time()
        proc = subprocess.Popen(
            [*cmd, "--resume", "auto"], cwd=ROOT, env=e, start_new_session=True, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline, metrics = time.time() + 240, run_dir / "metrics.jsonl"
        while time.time() < deadline and proc.poll() is None:
            if (
                metrics.exists()
                and metrics.stat().st_mtime > started
                and max(losses(run_dir), default=0) >= step
            ):
                return proc
            time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"step {step} not reached: {proc.communicate()[0][-3000:]}")

    first = srun(5)
    os.killpg(first.pid, signal.SIGINT)  # the terminal's foreground group: srun
    time.sleep(0.3)
    os.killpg(first.pid, signal.SIGINT)
    for proc, how in ((first, "ctrl-c"), (srun(7), "sigterm")):
        if how == "sigterm":
            before = latest()
            os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
        assert "srun: forcing job termination" in out, out[-3000:]
        assert not (run_dir / "PREEMPTED").exists(), out[-3000:]
        assert latest() >= (4 if how == "ctrl-c" else before), out[-3000:]  # periodic saves intact
        time.sleep(3)  # slurmstepd reaps the step

    third = srun(latest() + 3)
    job = cluster.run(["squeue", "-h", "-o", "%i"]).stdout.split()
    assert len(job) == 1, job
    cluster.run(["scancel", "--signal=TERM", job[0]])  # to every task of the job's steps
    out = third.communicate(timeout=120)[0]
    assert (run_dir / "PREEMPTED").is_file(), out[-3000:]
    stopped = json.loads((run_dir / "PREEMPTED").read_text())["step"]
    assert (run_dir / "EXIT_STATUS").read_text().split("\n")[0] == "99 preempted", out[-3000:]
    assert latest() == stopped, out[-3000:]
    assert not re.search(r'File ".*(train\.py|roberta_ds/)', out), out[-3000:]  # no rank's traceback
    got = losses(run_dir)
    assert sorted(got) == list(range(1, max(got) + 1)) and max(got) <= 30
    assert got == {s: straight4[s] for s in got}
