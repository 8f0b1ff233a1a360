"""What the training loop is built from: the datasets and their DataLoader, the model (under
zero.Init for ZeRO-3, optionally from Hugging Face weights), and a checkpoint converted for a new
world size. Each is a function of the config; engine.py calls them and keeps only the loop."""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
from pathlib import Path

import torch

from roberta_ds.config import ConfigError, RunConfig
from roberta_ds.data.corpus import builtin_dataset_dir, prepare_builtin
from roberta_ds.data.dataset import DatasetError, read_metadata
from roberta_ds.data.masking import MaskedBlocks, MLMCollator
from roberta_ds.data.mixture import check_compatible, open_train, open_valid
from roberta_ds.data.sampler import BlockOrder, GlobalOrderSampler
from roberta_ds.model import RobertaMLM, load_hf
from roberta_ds.training import checkpoint, ds_config
from roberta_ds.training.distributed import barrier, rank0_does
from roberta_ds.training.preemption import ignore_stop_signals

log = logging.getLogger("roberta_ds.train")


# ---------------------------------------------------------------------------------------- data
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


def dataset_folders(cfg: RunConfig) -> list[Path]:
    """The datasets' folders (the first's tokenizer is the run's); the built-in corpus is prepared
    (once, cached) by rank 0, which tells every rank whether it worked."""
    d = cfg.data
    if d.dataset != "builtin":
        return d.folders

    def build():
        progress = cfg.train.progress_bar
        return prepare_builtin(d.cache_dir, d.tokenizer, d.vocab_size, d.seq_len, progress=progress)

    rank0_does(build, DatasetError)
    barrier()
    return [builtin_dataset_dir(d.cache_dir, d.tokenizer, d.vocab_size, d.seq_len)]


@dataclasses.dataclass
class Data:
    folder: Path  # the first dataset's
    seq_len: int  # the prepared length; data.seq_len_schedule may serve shorter blocks
    train: MaskedBlocks  # item (global position, catalog index) -> masked block
    order: BlockOrder  # global position -> catalog index
    valid: MLMCollator  # fixed masks (seed + 1) at the fixed data.mlm_probability


def build_data(cfg: RunConfig, folders: list[Path], global_batch: int) -> Data:
    """The datasets of `cfg`, resolved by with_datasets (its seq_len is theirs)."""
    d, seed = cfg.data, cfg.train.seed
    folder = folders[0]
    train_set, order = open_train(folders, d.weights, d.seq_len_schedule, global_batch, seed)
    return Data(
        folder=folder,
        seq_len=d.seq_len,
        train=MaskedBlocks.from_config(train_set, folder, d, seed, global_batch),
        order=order,
        valid=MLMCollator.from_config(open_valid(folders), folder, d, seed + 1),
    )


def build_loader(
    data: Data, cfg: RunConfig, global_batch: int, micro_batch: int, world: int, rank: int, start: int
) -> torch.utils.data.DataLoader:
    """This rank's micro-batches from global sample position `start` on, forever."""
    sampler = GlobalOrderSampler(
        len(data.train), global_batch, micro_batch, world, rank, cfg.train.seed, start=start, order=data.order
    )
    workers = cfg.data.num_workers
    return torch.utils.data.DataLoader(
        data.train,
        batch_sampler=sampler,
        collate_fn=data.train.collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),  # so that .to(device, non_blocking=True) overlaps
        worker_init_fn=functools.partial(ignore_stop_signals, (cfg.train.preempt_signal,)),
    )


def copy_tokenizer(data_dir: Path, run_dir: Path) -> None:
    """The run folder keeps its own tokenizer, so export needs nothing but the run folder."""
    dst = run_dir / "tokenizer"
    if dst.is_dir():
        return
    tmp = run_dir / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(data_dir / "tokenizer", tmp)
    tmp.rename(dst)


# ---------------------------------------------------------------------------------------- weights
def build_model(cfg: RunConfig, ds_cfg: dict) -> RobertaMLM:
    """The model with its initial weights. Under ZeRO-3 parameters are partitioned as each module
    is built (deepspeed.zero.Init), so a large model never sits whole on one rank; initial values
    are then written through GatheredParameters."""
    import deepspeed

    torch.manual_seed(cfg.train.seed)
    stage3 = ds_config.zero_stage(ds_cfg) == 3
    with deepspeed.zero.Init(config_dict_or_path=ds_cfg, enabled=stage3):
        model = RobertaMLM(cfg.model)
    init_weights(model, cfg.train.init_from_hf, stage3)
    return model


def init_weights(model: RobertaMLM, init_from_hf: str | None, stage3: bool) -> None:
    """Module by module: transformers' initialisation, or the weights of a Hugging Face folder."""
    import deepspeed

    hf_sd = load_hf(init_from_hf).state_dict() if init_from_hf else None
    if hf_sd is None and not stage3:
        return  # RobertaMLM.__init__ already initialised the whole (unpartitioned) model
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=stage3):
            if hf_sd is None:
                model._init_weights(module)
            else:
                for pname, p in module.named_parameters(recurse=False):
                    p.data.copy_(hf_sd[f"{name}.{pname}" if name else pname])
    if hf_sd is not None and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        log.info(f"initialised from Hugging Face weights at {init_from_hf}")


# ---------------------------------------------------------------------------------------- resume
def for_world(resume_from: Path, world: int, ds_cfg: dict) -> Path:
    """The checkpoint to load on `world` ranks: itself, or (ZeRO shards are per rank) its universal
    conversion when another world size saved it; then ds_cfg is set to load the universal format."""
    saved = checkpoint.saved_world_size(resume_from)
    if not saved or saved == world:
        return resume_from
    universal = checkpoint.to_universal(resume_from)
    ds_cfg.setdefault("checkpoint", {})["load_universal"] = True
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        log.info(f"resuming a {saved}-rank checkpoint on {world} ranks via {universal}")
    return universal
