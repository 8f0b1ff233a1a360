"""Launch paths beside torchrun/deepspeed: mpirun with mpi4py discovery, and a bounded rendezvous."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.training.conftest import ROOT, env, free_port, losses, write_config, write_ds

pytestmark = pytest.mark.multiproc


@pytest.mark.skipif(
    shutil.which("mpirun") is None, reason="Open MPI not installed (scripts/setup.sh installs it)"
)
def test_mpirun_trains_with_mpi4py_discovery(kjv_dataset, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", kjv_dataset, tmp_path / "run", max_steps=6, save_every=3)
    ds = write_ds(tmp_path / "ds.json")
    e = {k: v for k, v in env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    e.update(
        MASTER_ADDR="127.0.0.1", OMPI_MCA_plm="isolated", OMPI_MCA_btl_vader_single_copy_mechanism="none"
    )
    cmd = [
        "mpirun",
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        "2",
        "-x",
        "MASTER_ADDR",
        "-x",
        "OMP_NUM_THREADS",
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        str(cfg),
        "--deepspeed_config",
        str(ds),
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
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
