"""Resolve, then build. One stage, before any process group or model exists, reads each fact of
a run from its owner once and freezes them into a `Run`:

  the run YAML         the recipe (model, data, train sections), checked by roberta_ds/config.py
  the ds_config JSON   batch sizes (by DeepSpeed's own arithmetic for this world size), precision,
                       ZeRO stage, offload (training/ds_config.py)
  the datasets         model.vocab_size and data.seq_len (their metadata.json; the built-in corpus
                       is prepared here, by every rank together, see dataset_folders)
  the run folder       one run at a time (its lock) and never another run's checkpoints (run_dir.py)
  the checkpoint       what it was trained with (its manifest: precision, model), and whether it
                       must be loaded through DeepSpeed's universal format (another world saved it)

Once the engine is built and the checkpoint loaded, rank 0 writes the run folder's run_config.yaml,
ds_config.json and tokenizer/ (write_run_folder: a session that fails before that leaves the folder
as it was, so a retry with another config is not "another run"). Builders take the
`Run` and build; nothing changes it afterwards. Every check here runs on every rank, so a bad input
is one message on each, before any rank waits for another.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import torch
import yaml

from roberta_ds.config import ConfigError, RunConfig
from roberta_ds.data.corpus import prepare_builtin
from roberta_ds.data.dataset import DatasetError, read_metadata
from roberta_ds.data.mixture import check_compatible
from roberta_ds.training import checkpoint, ds_config
from roberta_ds.training.distributed import expected_local_world_size, expected_rank, expected_world_size
from roberta_ds.training.preflight import preflight
from roberta_ds.training.run_dir import check_run_dir
from roberta_ds.training.run_dir import lock as run_dir_lock

log = logging.getLogger("roberta_ds.train")


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything a run is built from, resolved. `ds` is handed to DeepSpeed as a copy."""

    cfg: RunConfig  # vocab_size and seq_len are the datasets'
    ds: dict  # the engine's DeepSpeed config: batch fields filled in for `world`
    ds_source: str  # the JSON it came from (named in messages)
    precision: str  # fp32 | bf16 | fp16
    world: int  # data-parallel ranks this run expects (the launcher's)
    run_dir: Path
    folders: tuple[Path, ...]  # the datasets' folders; the first one's tokenizer is the run's
    resume: Path | None  # the checkpoint to load, checked against this run
    global_batch: int  # sequences per optimizer step, all ranks = micro_batch x accum x world
    micro_batch: int  # sequences per rank per forward
    accum: int  # micro-batches per rank per optimizer step
    zero_stage: int  # 0-3
    offload: bool  # the optimizer's states and step on the CPU (DeepSpeed's CPU Adam)
    lock: int | None = dataclasses.field(default=None, compare=False, repr=False)  # rank 0: the run folder's


def resolve_run(cfg: RunConfig, ds_config_path: str | Path) -> Run:
    """The run described by `cfg` and the DeepSpeed JSON, on the world the launcher set up."""
    rank, world, local_world = expected_rank(), expected_world_size(), expected_local_world_size()
    run_dir = Path(cfg.train.run_dir)
    lock = run_dir_lock(run_dir) if rank == 0 else None  # held until the process exits
    try:
        ds_raw = ds_config.load_ds_config(ds_config_path)
        ds_config.check_for_device(ds_raw, "cuda" if torch.cuda.is_available() else "cpu")
        precision = ds_config.precision(ds_raw)
        ds = ds_config.for_engine(ds_raw, world, run_dir)
        zero_stage, offload = ds_config.zero_stage(ds), ds_config.offloads_optimizer(ds)
        folders = dataset_folders(cfg, local_world, show_progress=rank == 0)
        cfg = with_datasets(cfg, folders, ds["train_batch_size"])
        check_run_dir(cfg, run_dir)
        resume = checkpoint.resolve_resume(
            cfg.train.resume, run_dir, precision, ds_raw["_source"], dataclasses.asdict(cfg.model)
        )
        if resume is not None and checkpoint.needs_universal(resume, world):
            ds = {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}
        estimate = preflight(
            cfg.model,
            ds_raw | ds,
            precision,
            world,
            local_world,
            cfg.data.seq_len,
            cfg.data.peak_mlm_probability,  # the masked rows the head must hold at once
        )
        run = Run(
            cfg,
            ds,
            ds_raw["_source"],
            precision,
            world,
            run_dir,
            tuple(folders),
            resume,
            *(ds[k] for k in ds_config.BATCH_KEYS),  # global, micro, accumulation
            zero_stage=zero_stage,
            offload=offload,
            lock=lock,
        )
        if rank == 0:
            log.info(estimate)
    except BaseException:
        if lock is not None:  # in-process callers (tests) may go on to use the folder
            os.close(lock)
        raise
    return run


def write_run_folder(run: Run) -> None:
    """run_config.yaml (the resolved config), ds_config.json (the engine's) and the tokenizer, so
    that the folder alone says what ran and export needs nothing else. Each file is replaced whole."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("run_config.yaml", yaml.safe_dump(run.cfg.to_dict(), sort_keys=False)),
        ("ds_config.json", json.dumps(run.ds, indent=2)),
    ):
        tmp = run.run_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(run.run_dir / name)
    if not (run.run_dir / "tokenizer").is_dir():
        tmp = run.run_dir / ".tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(run.folders[0] / "tokenizer", tmp)
        tmp.rename(run.run_dir / "tokenizer")


# ---------------------------------------------------------------------------------------- datasets
def dataset_folders(cfg: RunConfig, local_world: int = 1, show_progress: bool = True) -> list[Path]:
    """The datasets' folders. The built-in corpus is prepared (once, cached) by whichever ranks get
    here: prepare's task locks let one rank do each task while the others wait for it and reuse it,
    so no process group is needed, and a bad input fails on every rank with its own message."""
    d = cfg.data
    if d.dataset != "builtin":
        return d.folders
    workers = max(1, (os.cpu_count() or 1) // local_world)  # the node's cores, shared by its ranks
    progress = cfg.train.progress_bar and show_progress
    return [prepare_builtin(d.cache_dir, d.tokenizer, d.vocab_size, d.seq_len, progress, workers)]


def with_datasets(cfg: RunConfig, folders: list[Path], global_batch: int) -> RunConfig:
    """`cfg` with the values the datasets own (model.vocab_size, data.seq_len), after checking that
    every dataset (several in a mixture: one tokenizer, one seq_len) can feed this run. A new config:
    the one passed in is not changed."""
    meta = check_compatible(folders)
    for folder in folders:
        check_dataset(cfg, folder, global_batch)
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, vocab_size=meta["vocab_size"]),
        data=dataclasses.replace(cfg.data, seq_len=meta["seq_len"]),
    )


def check_dataset(cfg: RunConfig, folder: Path, global_batch: int) -> dict:
    """The dataset owns vocab size and block length: a stated value must agree with it; and it must
    be able to feed this run. Returns its metadata."""
    meta = read_metadata(folder)
    m, d, t, stated = cfg.model, cfg.data, cfg.train, cfg.stated
    if "model.vocab_size" in stated and meta["vocab_size"] != m.vocab_size:
        raise ConfigError(
            f"the tokenizer of {folder} has {meta['vocab_size']} tokens but "
            f"model.vocab_size={m.vocab_size}; set model.vocab_size: {meta['vocab_size']} or leave it out"
        )
    if d.dataset != "builtin" and "data.seq_len" in stated and meta["seq_len"] != d.seq_len:
        raise ConfigError(
            f"{folder} holds blocks of {meta['seq_len']} tokens but data.seq_len={d.seq_len}; "
            "leave data.seq_len out (the dataset sets it) or prepare the data again"
        )
    if meta["seq_len"] > m.max_seq_len:
        raise ConfigError(
            f"{folder} has seq_len={meta['seq_len']}, above the model's {m.max_seq_len} positions"
        )
    longest = max((L for _, L in d.seq_len_schedule or []), default=0)
    if longest > meta["seq_len"]:
        raise ConfigError(
            f"data.seq_len_schedule asks for blocks of {longest} tokens but {folder} holds blocks of "
            f"{meta['seq_len']}; shorter blocks are cut from prepared ones, longer ones need a new "
            "prepare"
        )
    train_blocks = meta["splits"]["train"]["num_blocks"]
    if train_blocks < global_batch:
        raise DatasetError(
            f"{folder}: the train split has {train_blocks} blocks, fewer than one global batch "
            f"(train_batch_size={global_batch}); add data or lower train_batch_size"
        )
    if t.eval_every and meta["splits"].get("valid", {}).get("num_blocks", 0) == 0:
        raise DatasetError(
            f"{folder}: the valid split is empty but train.eval_every={t.eval_every}; prepare with "
            "a smaller --valid-every or set train.eval_every: 0"
        )
    if not (folder / "tokenizer").is_dir():
        raise DatasetError(f"{folder / 'tokenizer'}: tokenizer folder missing; prepare the dataset again")
    return meta
