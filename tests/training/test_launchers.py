"""Launch paths beside torchrun/deepspeed: mpirun with mpi4py discovery, and a bounded rendezvous."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.training.conftest import (
    ROOT,
    env,
    free_port,
    launch_cmd,
    launcher_env,
    losses,
    write_config,
    write_ds,
)

pytestmark = pytest.mark.multiproc


@pytest.mark.skipif(
    shutil.which("mpirun") is None, reason="Open MPI not installed (scripts/setup.sh installs it)"
)
def test_mpirun_trains_with_mpi4py_discovery(kjv_dataset, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", kjv_dataset, tmp_path / "run", max_steps=6, save_every=3)
    ds = write_ds(tmp_path / "ds.json")
    cmd = launch_cmd("mpirun", 2, cfg, ds)
    res = subprocess.run(
        cmd, cwd=ROOT, env=launcher_env("mpirun"), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "world 2" in res.stdout + res.stderr
    assert sorted(losses(tmp_path / "run")) == list(range(1, 7))


def test_unreachable_master_fails_within_the_rendezvous_timeout(kjv_dataset, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", kjv_dataset, tmp_path / "run")
    ds = write_ds(tmp_path / "ds.json", train_batch_size=8, train_micro_batch_size_per_gpu=4)
    # rank 1 of 2 with nobody serving the rendezvous: it must give up, not hang
    port = free_port()
    e = dict(
        env(),
        RANK="1",
        WORLD_SIZE="2",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RDZV_TIMEOUT="5",
    )
    res = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(cfg), "--deepspeed_config", str(ds)],
        cwd=ROOT,
        env=e,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 3, res.stderr[-3000:]
    assert f"could not join the process group at master 127.0.0.1:{port} within 5 s" in res.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


SLURM_TASK = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4"}
TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.mark.parametrize(
    "given, want",
    [
        (SLURM_TASK, {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}),  # a task of `srun python train.py`
        ({**SLURM_TASK, "SLURM_STEP_NUM_TASKS": "2"}, {"RANK": "3", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}),
        ({**SLURM_TASK, "RANK": "5", "WORLD_SIZE": "8"}, {"RANK": "5", "WORLD_SIZE": "8"}),  # a launcher's
        ({k: v for k, v in SLURM_TASK.items() if k != "SLURM_STEP_ID"}, {}),  # the batch script itself
    ],
)
def test_slurm_task_variables_map_onto_torchs(monkeypatch, given, want):
    from roberta_ds.training.distributed import fill_env_from_slurm

    # a private copy of the environment: fill_env_from_slurm writes RANK/WORLD_SIZE/LOCAL_RANK, which
    # would otherwise outlive the test and make every later train.py subprocess a rank of 4
    monkeypatch.setattr(os, "environ", os.environ.copy())
    for key in (*TORCH_VARS, "SLURM_STEP_NUM_TASKS", *SLURM_TASK):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    for key, value in given.items():
        monkeypatch.setenv(key, value)
    fill_env_from_slurm()
    assert {k: os.environ[k] for k in TORCH_VARS if k in os.environ} == want


def test_the_slurm_scripts_leave_the_rank_mapping_to_python():
    """One owner: no script under slurm/ sets torch's rank variables (fill_env_from_slurm does)."""
    for script in (ROOT / "slurm").iterdir():
        assert not re.search(r"\b(RANK|LOCAL_RANK|WORLD_SIZE)=", script.read_text()), script


# What each launcher returns for a bad input (the ranks exit 2), as measured; EXIT_STATUS holds the
# verdict whatever it is. The table is in docs/reliability.md.
BAD_INPUT_RC = {"python": 2, "torchrun": 1, "deepspeed": 2, "mpirun": 2}


@pytest.mark.parametrize("launcher", sorted(BAD_INPUT_RC))
def test_a_bad_input_is_told_apart_under_every_launcher(launcher, kjv_dataset, tmp_path):
    if launcher == "mpirun" and shutil.which("mpirun") is None:
        pytest.skip("Open MPI not installed (scripts/setup.sh installs it)")
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", kjv_dataset, run_dir, lr=-1.0)
    ds = write_ds(tmp_path / "ds.json")
    cmd = launch_cmd(launcher, 1 if launcher == "python" else 2, cfg, ds)
    r = subprocess.run(cmd, cwd=ROOT, env=launcher_env(launcher), capture_output=True, text=True, timeout=120)
    msg = f"train.py: error: {cfg}: train: train.lr=-1.0 must be >= 0"
    assert r.returncode == BAD_INPUT_RC[launcher], r.stdout[-2000:] + r.stderr[-2000:]
    assert (run_dir / "EXIT_STATUS").read_text().rstrip() == f"2 bad-input\n{msg}"  # then padding
    assert 'train.py", line' not in r.stderr  # no rank's own traceback (torchrun has its own)
    if launcher == "torchrun":  # its ~40-line report ends with the rank's message
        tail = [line for line in r.stderr.splitlines() if line.strip()][-2]
        assert tail == f"  traceback : {msg}"
