"""The run folder: one run at a time (an exclusive lock held for the run's life), and never another
run's checkpoints (what a checkpoint itself was trained with is checkpoint.py's)."""

from __future__ import annotations

import dataclasses
import fcntl
import os
from pathlib import Path

import yaml

from roberta_ds.config import ConfigError, DataConfig, ModelConfig, RunConfig
from roberta_ds.errors import RunDirInUse
from roberta_ds.training.checkpoint import RUNTIME_ONLY

LOCK_FILE = ".lock"


def lock(run_dir: Path) -> int:
    """Take the run folder's exclusive lock (fcntl.flock on run_dir/.lock) for the life of the
    process; the OS releases it when the process dies, however it dies. Returns the open fd."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunDirInUse(
            f"{run_dir} is in use by another run (process {holder} holds {path}); wait for it to "
            "finish or pick another train.run_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {os.uname().nodename}\n".encode(), 0)
    return fd


def _defaults(kind) -> dict:
    return {f.name: f.default for f in dataclasses.fields(kind) if f.default is not dataclasses.MISSING}


def check_run_dir(cfg: RunConfig, run_dir: Path) -> None:
    """A new run never overwrites another run's checkpoints."""
    saved = run_dir / "run_config.yaml"
    if not saved.is_file():
        if (run_dir / "checkpoints").exists():
            raise ConfigError(
                f"{run_dir} holds checkpoints but no run_config.yaml; pick another train.run_dir"
            )
        return
    old = yaml.safe_load(saved.read_text()) or {}
    new = cfg.to_dict()
    for section, kind in (("model", ModelConfig), ("data", DataConfig)):
        # a key the saved config lacks was added since that run started: it ran with the default
        was = {**_defaults(kind), **(old.get(section) or {})}
        # both resolved: the datasets' vocab_size and seq_len count like stated values
        diff = sorted(k for k in new[section] if k not in RUNTIME_ONLY and was.get(k) != new[section][k])
        if diff and cfg.train.resume is not None:
            raise ConfigError(
                f"{run_dir} holds another run (its {section} differs in {diff}); pick another train.run_dir"
            )
    if cfg.train.resume is None and (run_dir / "checkpoints").exists():
        raise ConfigError(
            f"{run_dir} already holds checkpoints; set train.resume: auto to continue that run "
            "or pick another train.run_dir"
        )
