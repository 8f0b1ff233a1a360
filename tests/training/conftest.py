import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def write_config(path: Path, dataset: Path, run_dir: Path, model: dict | None = None, **train) -> Path:
    import yaml

    cfg = {
        "model": {
            "preset": "tiny",
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 128,
            "max_position_embeddings": 66,
            "kernels": "torch",
            **(model or {}),
        },
        "data": {"dataset": str(dataset), "seq_len": 64, "num_workers": 0},
        "train": {
            "run_dir": str(run_dir),
            "max_steps": 30,
            "lr": 2e-3,
            "warmup_steps": 5,
            "log_every": 1,
            "eval_every": 0,
            "save_every": 10,
            "keep_last": 3,
            "progress_bar": False,
            **train,
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_ds(path: Path, **extra) -> Path:
    cfg = {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": 3},
        "steps_per_print": 10**6,
        "csv_monitor": {"enabled": True},
        **extra,
    }
    path.write_text(json.dumps(cfg))
    return path


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("TRITON_INTERPRET", None)
    return e


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(launcher: str, nproc: int, config: Path, ds: Path, *extra: str) -> list[str]:
    port = free_port()
    if launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={port}",
        ]
    elif launcher == "deepspeed":
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            f"--num_gpus={nproc}",
            f"--master_port={port}",
        ]
    elif launcher == "mpirun":  # mpi4py discovery; MASTER_ADDR and the rest from launcher_env
        cmd = [*MPIRUN, "-np", str(nproc), "-x", "MASTER_ADDR", "-x", "OMP_NUM_THREADS", sys.executable]
    else:
        cmd = [sys.executable]
    return cmd + [str(ROOT / "train.py"), "--config", str(config), "--deepspeed_config", str(ds), *extra]


# Open MPI as root in a container (more ranks than cores is fine for the tests)
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe"]


def launcher_env(launcher: str) -> dict:
    """env() for a launch; under mpirun without torch's rank variables (mpi4py says who is who)."""
    e = env()
    if launcher == "mpirun":
        e = {k: v for k, v in e.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        e.update(
            MASTER_ADDR="127.0.0.1", OMPI_MCA_plm="isolated", OMPI_MCA_btl_vader_single_copy_mechanism="none"
        )
    return e


def launch(launcher: str, nproc: int, config: Path, ds: Path, *extra: str, timeout=300, **_):
    cmd = launch_cmd(launcher, nproc, config, ds, *extra)
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="session")
def straight(kjv_dataset, tmp_path_factory):
    """losses_of(world): per-step losses of an uninterrupted run (launching.stop_config's schedule),
    computed once per world size: what a stopped and resumed run must replay."""
    from tests.training.launching import straight_losses

    cache: dict[int, dict[int, float]] = {}

    def losses_of(world: int) -> dict[int, float]:
        if world not in cache:
            cache[world] = straight_losses(kjv_dataset, tmp_path_factory.mktemp(f"straight{world}"), world)
        return cache[world]

    return losses_of
