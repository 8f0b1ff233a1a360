"""Checkpoints: DeepSpeed's sharded states plus our client state, an atomic `latest` pointer, and
the last K kept.

  run_dir/checkpoints/step_00000500/   DeepSpeed files (ZeRO shards), rng_rank*.pt, COMPLETE
  run_dir/checkpoints/latest           text: the tag of the newest complete checkpoint (written by
                                       rename, after every rank finished; DeepSpeed's own non-atomic
                                       'latest' is turned off)
A checkpoint without COMPLETE (a rank killed mid-save) is never resumed from.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from roberta_ds.training.distributed import barrier

COMPLETE = "COMPLETE"


class CheckpointError(ValueError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, run_dir: Path, step: int, client_state: dict, keep_last: int, rank: int) -> Path:
    ckpt_root = run_dir / "checkpoints"
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), ckpt_root / tag / f"rng_rank{rank:05d}.pt")
    barrier()
    if rank == 0:
        (ckpt_root / tag / COMPLETE).write_text(f"{step}\n")
        tmp = ckpt_root / f".latest.tmp{os.getpid()}"
        tmp.write_text(tag + "\n")
        os.replace(tmp, ckpt_root / "latest")  # atomic: readers see the old or the new tag
        done = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
        for old in done[:-keep_last] if keep_last > 0 else []:
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return ckpt_root / tag


def resolve(path_or_auto: str | None, run_dir: Path) -> Path | None:
    """The checkpoint folder to resume from: 'auto' = this run's latest (None if it has none);
    a run folder = its latest; a step_* folder = itself. Missing or incomplete ones are errors."""
    if path_or_auto is None:
        return None
    if path_or_auto == "auto":
        if not (run_dir / "checkpoints" / "latest").is_file():
            return None
        path = run_dir
    else:
        path = Path(path_or_auto)
    if (path / "checkpoints" / "latest").is_file():
        path = path / "checkpoints"
    if (path / "latest").is_file():
        tag = (path / "latest").read_text().strip()
        path = path / tag
    if not path.is_dir():
        raise CheckpointError(f"checkpoint to resume from not found: {path}")
    if not (path / COMPLETE).is_file():
        raise CheckpointError(
            f"{path}: incomplete or corrupt checkpoint (no {COMPLETE} marker; the save was "
            "interrupted) - resume from an earlier step_* folder"
        )
    return path


def load(engine, ckpt: Path, rank: int, load_optimizer: bool = True) -> dict:
    path, client_state = engine.load_checkpoint(
        str(ckpt.parent), tag=ckpt.name, load_optimizer_states=load_optimizer, load_lr_scheduler_states=True
    )
    if path is None:
        raise CheckpointError(f"{ckpt}: DeepSpeed could not load this checkpoint")
    rng = ckpt / f"rng_rank{rank:05d}.pt"
    if rng.is_file():  # absent when resuming on more ranks than saved; steps reseed anyway
        set_rng_state(torch.load(rng, weights_only=False))
    return client_state


def saved_world_size(ckpt: Path) -> int:
    """Data-parallel ranks that wrote a ZeRO checkpoint (one model-states file each); 0 without ZeRO."""
    return len(list(ckpt.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")))


def to_universal(ckpt: Path, rank: int) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (once; rank 0 writes, the others
    wait), so that it can be resumed on a different number of ranks."""
    out = ckpt.parent / "universal" / ckpt.name
    if rank == 0 and not out.is_dir():
        import subprocess
        import sys

        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(ckpt),
            "--output_folder",
            str(tmp),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise CheckpointError(
                f"{ckpt}: conversion to a universal checkpoint failed:\n{res.stderr[-2000:]}"
            )
        for f in ckpt.glob("rng_rank*.pt"):
            shutil.copy(f, tmp / f.name)
        tmp.rename(out)
    barrier()
    return out
